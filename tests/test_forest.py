"""`lineage.forest` and `lineage.ancestors` over experiment folders as found on disk: parents
before children, sources outside the Dora folder as roots, and folders edited by hand (a cycle,
a lineage.json that is a link or not JSON) never loop or fail."""

from __future__ import annotations

import json
from pathlib import Path

from solver import lineage
from solver.experiment import Experiment, experiments


def folders(tmp_path: Path, parents: dict[str, str | None]) -> list[Experiment]:
    """Experiment folders `xps/<sig>`, each with a lineage.json naming its parent (None: none)."""
    for sig, parent in parents.items():
        folder = tmp_path / 'xps' / sig
        folder.mkdir(parents=True)
        if parent is not None:
            (folder / lineage.LINEAGE).write_text(json.dumps({'sig': parent, 'continue_from': f'//sig/{parent}'}))
    return experiments(tmp_path)


def test_the_forest_lists_parents_before_their_children_depth_first(tmp_path):
    xps = folders(tmp_path, {'a': None, 'b': 'a', 'c': 'b', 'd': 'a', 'e': None, 'f': 'elsewhere'})
    assert [(depth, xp.sig) for depth, xp in lineage.forest(xps)] == [
        (0, 'a'), (1, 'b'), (2, 'c'), (1, 'd'), (0, 'e'), (0, 'f')]


def test_ancestors_go_up_to_the_first_source_outside_the_dora_folder(tmp_path):
    xps = folders(tmp_path, {'a': 'pretrained', 'b': 'a', 'c': 'b'})
    chain = lineage.ancestors(xps[2], xps)
    assert [(entry['sig'], up.sig if up else None) for entry, up in chain] == [('b', 'b'), ('a', 'a'),
                                                                                ('pretrained', None)]


def test_a_cycle_made_by_hand_is_broken_where_it_is_met(tmp_path):
    xps = folders(tmp_path, {'a': 'b', 'b': 'a', 'c': 'c'})
    assert sorted(xp.sig for _, xp in lineage.forest(xps)) == ['a', 'b', 'c']
    assert len(lineage.ancestors(xps[0], xps)) == 2


def test_a_lineage_file_that_is_a_link_or_not_json_is_no_lineage(tmp_path):
    xps = folders(tmp_path, {'a': None, 'b': None, 'c': None})
    (xps[1].folder / lineage.LINEAGE).symlink_to(tmp_path / 'xps' / 'a')
    (xps[2].folder / lineage.LINEAGE).write_text('{"sig": "a"')
    assert lineage.read(xps[1].folder) is None and lineage.read(xps[2].folder) is None
    assert [(depth, xp.sig) for depth, xp in lineage.forest(xps)] == [(0, 'a'), (0, 'b'), (0, 'c')]
