"""Magenta's beam search: 1/1/1 is the plain sampling of before, and a wider search finds the most
likely sequence where plain sampling is lured away from it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from solver.drums.model import NUM_EVENTS, DrumRNN, beam_search, sample


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Chain(nn.Module):
    """A first-order Markov chain in DrumRNN's shape: the logits depend on the last event only.

    From silence (and any event but 1 and 2): event 1 with p = 0.6, event 2 with p = 0.4. From 1:
    any of the 512 events alike. From 2: event 2 again, almost surely. The most likely sequence
    after a silent primer is 2, 2, 2, ... (log-likelihood log 0.4); plain sampling takes the lure,
    event 1, six times in ten, and then every step costs log 512.
    """

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Identity()  # not an AttentionLSTM: states are nn.LSTM-shaped [1, B, H]
        table = torch.full((NUM_EVENTS, NUM_EVENTS), -1e4)
        table[:, 1], table[:, 2] = math.log(0.6), math.log(0.4)
        table[1] = 0.0
        table[2] = -1e4
        table[2, 2] = 0.0
        self.table = table
        self.batches: list[int] = []  # the batch of each forward: how many sequences it extends

    def forward(self, events: Tensor, state: tuple | None = None, start: int | Tensor = 0) -> tuple[Tensor, tuple]:
        self.batches.append(events.shape[0])
        return self.table[events], ((events[:, -1:].float()[None],),)


def test_plain_sampling_is_the_sampling_of_before_byte_for_byte():
    # Recorded with `sample` before beam search existed (commit 07a2fbd), torch 2.13.0.
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=8, num_layers=2)
    events = sample(model, torch.tensor([1]), 24, 1.0, generator=torch.Generator().manual_seed(7))
    assert events.tolist() == [1, 200, 343, 118, 445, 374, 170, 185, 42, 487, 359, 437, 129, 117, 113, 143,
                               319, 340, 11, 365, 148, 477, 155, 167]
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=8, num_layers=1, attention_length=4)
    events, _ = beam_search(model, torch.tensor([1, 0, 4]), 20, 0.8, torch.Generator().manual_seed(7), 1, 1, 1)
    assert events.tolist() == [1, 0, 4, 200, 343, 118, 445, 374, 170, 501, 42, 487, 452, 437, 129, 117, 113, 143,
                               319, 340]


@pytest.mark.parametrize('seed', range(5))
def test_a_wide_beam_finds_the_most_likely_sequence(seed):
    events, log_likelihood = beam_search(Chain(), torch.tensor([0]), 9, generator=torch.Generator().manual_seed(seed),
                                         beam_size=16, branch_factor=2, steps_per_iteration=2)
    assert events.tolist() == [0] + [2] * 8
    assert log_likelihood == pytest.approx(math.log(0.4), abs=1e-3)


def test_plain_sampling_is_lured_where_the_beam_is_not():
    draws = [beam_search(Chain(), torch.tensor([0]), 9, generator=torch.Generator().manual_seed(seed))
             for seed in range(20)]
    lured = [ll for events, ll in draws if events[1] == 1]
    assert 5 <= len(lured) <= 18  # about 12 of 20
    assert all(ll <= math.log(0.6) - math.log(NUM_EVENTS) + 1e-3 < math.log(0.4) for ll in lured)


def test_each_iteration_extends_beam_size_times_branch_factor_sequences_by_steps_per_iteration():
    chain = Chain()
    beam_search(chain, torch.tensor([0]), 11, generator=torch.Generator().manual_seed(0),
                beam_size=3, branch_factor=2, steps_per_iteration=4)
    # The primer; 10 steps to make: first (10 - 1) % 4 + 1 = 2 steps of the 3 beams, then two
    # iterations of 4 steps of 3 x 2 branches; no forward after the last step.
    assert chain.batches == [1] + [3] * 2 + [6] * 4 + [6] * 3


@pytest.mark.parametrize('attention_length', [0, 4])
def test_the_log_likelihood_is_that_of_the_returned_steps_under_the_tempered_model(attention_length):
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=8, num_layers=2, attention_length=attention_length).eval()
    primer = torch.tensor([1, 4])
    events, log_likelihood = beam_search(model, primer, 14, 0.7, torch.Generator().manual_seed(1),
                                         beam_size=3, branch_factor=2, steps_per_iteration=5)
    with torch.no_grad():
        logits, _ = model(events[None, :-1])
    steps = torch.log_softmax(logits[0] / 0.7, dim=-1).gather(1, events[1:, None])[:, 0]
    assert log_likelihood == pytest.approx(float(steps[len(primer) - 1:].sum()), abs=1e-4)


@pytest.mark.parametrize('flag', ['beam_size', 'branch_factor', 'steps_per_iteration'])
def test_search_sizes_must_be_positive(flag):
    with pytest.raises(ValueError, match=f'generate.{flag}'):
        beam_search(Chain(), torch.tensor([0]), 4, **{flag: 0})
