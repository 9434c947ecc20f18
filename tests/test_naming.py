"""The one grammar for naming a checkpoint (checkpointing/naming.py): what each form parses to,
what it locates in an experiments folder, and the errors of names that name nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from solver.checkpointing.naming import CheckpointName, Form, NamingError, is_url, locate, parse

PARSED = [
    # text, form, value, sig, file
    ('s3://bucket/runs/abc123', Form.URL, 's3://bucket/runs/abc123', None, None),
    ('file:///tmp/x/checkpoint.th', Form.URL, 'file:///tmp/x/checkpoint.th', None, None),
    ('//pretrained/drums', Form.PRETRAINED, 'drums', None, None),
    ('//sig/abc123', Form.SIGNATURE, 'abc123', 'abc123', None),
    ('//sig/abc123/checkpoint_3.th', Form.SIGNATURE, 'abc123', 'abc123', 'checkpoint_3.th'),
    ('abc123', Form.LOCAL, 'abc123', 'abc123', None),
    ('abc', Form.LOCAL, 'abc', 'abc', None),
    ('abc123/checkpoint_3.th', Form.LOCAL, 'abc123/checkpoint_3.th', 'abc123', 'checkpoint_3.th'),
    ('/abs/path/checkpoint.th', Form.LOCAL, '/abs/path/checkpoint.th', None, None),
    ('./checkpoint.th', Form.LOCAL, './checkpoint.th', None, None),
    ('~/runs/xp', Form.LOCAL, '~/runs/xp', None, None),
    ('a/b/c.th', Form.LOCAL, 'a/b/c.th', None, None),
]


@pytest.mark.parametrize('text,form,value,sig,file', PARSED, ids=[row[0] for row in PARSED])
def test_each_form_parses_to_one_typed_name(text, form, value, sig, file):
    assert parse(text) == CheckpointName(text, form, value, sig, file)


MALFORMED = [
    ('',                   'empty'),
    ('   ',                'empty'),
    ('//pretrained/',      'one word after //pretrained/'),
    ('//pretrained/a/b',   'one word after //pretrained/'),
    ('//pretrained/..',    'one word after //pretrained/'),
    ('//sig/',             'one word after //sig/'),
    ('//sig/../etc',       'one word after //sig/'),
    ('//sig/abc/x/y',      'one name'),
    ('//other/abc',        'unknown form'),
]


@pytest.mark.parametrize('text,why', MALFORMED, ids=[repr(row[0]) for row in MALFORMED])
def test_a_malformed_name_is_refused_saying_why(text, why):
    with pytest.raises(NamingError, match=why):
        parse(text)


def test_urls_are_told_from_paths_and_special_forms():
    assert is_url('s3://b/x') and is_url('gs://b') and is_url('file:///x')
    assert not is_url('//sig/abc') and not is_url('/abs/path') and not is_url('abc123') and not is_url('c:x')


@pytest.fixture
def xps(tmp_path: Path) -> Path:
    for sig in ('abc123', 'abd999', 'f00d42'):
        (tmp_path / 'xps' / sig).mkdir(parents=True)
    (tmp_path / 'xps' / 'abc123' / 'checkpoint_3.th').write_bytes(b'x')
    return tmp_path / 'xps'


LOCATED = [
    ('//sig/abc123',                 'abc123'),
    ('//sig/abc123/checkpoint_3.th', 'abc123/checkpoint_3.th'),
    ('abc123',                       'abc123'),
    ('f0',                           'f00d42'),          # a unique prefix, as with git
    ('abc1',                         'abc123'),
    ('abc123/checkpoint_3.th',       'abc123/checkpoint_3.th'),
    ('abc1/checkpoint_3.th',         'abc123/checkpoint_3.th'),
]


@pytest.mark.parametrize('text,expected', LOCATED, ids=[row[0] for row in LOCATED])
def test_a_signature_name_locates_its_experiment_or_file(xps, text, expected):
    assert locate(parse(text), xps) == xps / expected


def test_a_local_path_wins_over_a_signature_of_the_same_spelling(xps, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'abc123').mkdir()
    assert locate(parse('abc123'), xps) == Path('abc123')
    (tmp_path / 'file.th').write_bytes(b'x')
    assert locate(parse('file.th'), xps) == (tmp_path / 'file.th').resolve()


UNKNOWN = [
    ('ab',                        r"neither a file, a folder nor a signature .* Near: abc123, abd999"),
    ('zzzzzz',                    r"neither a file, a folder nor a signature .* Known: 3 experiment"),
    ('/no/such/path',             r"'/no/such/path' is neither a file, a folder nor a signature"),
    ('//sig/0badc0de',            r"no experiment '0badc0de' in "),
    ('//sig/abc123/checkpoint_9.th', r"experiment abc123 has no file 'checkpoint_9.th'"),
    ('abc123/checkpoint_9.th',    r"experiment abc123 has no file 'checkpoint_9.th'"),
    ('zz/checkpoint_3.th',        r"neither a file, a folder nor a signature"),
]


@pytest.mark.parametrize('text,message', UNKNOWN, ids=[row[0] for row in UNKNOWN])
def test_a_name_that_names_nothing_is_one_error_naming_it(xps, tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NamingError, match=message):
        locate(parse(text), xps)


@pytest.mark.parametrize('text', ['s3://bucket/x', '//pretrained/drums'])
def test_urls_and_pretrained_names_are_for_the_caller_to_fetch_or_find(xps, text):
    with pytest.raises(NamingError, match='the caller'):
        locate(parse(text), xps)


def test_the_grammar_needs_no_torch():
    code = "import sys; import solver.checkpointing.naming; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).resolve().parents[1])
