"""The drum RNN: Magenta's drum_kit inputs, the network, sampling and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from solver.drums.model import (
    NUM_EVENTS,
    NUM_INPUTS,
    AttentionLSTM,
    DrumRNN,
    finalize_metrics,
    input_features,
    input_gates,
    sample,
    sequence_metrics,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second OpenMP thread only adds synchronisation, which costs ten times
    the work when another process holds the other core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_inputs_are_the_one_hot_event_then_the_counter_of_the_predicted_position():
    events = torch.tensor([[7, 0, 511]])
    features = input_features(events)
    assert features.shape == (1, 3, NUM_INPUTS) == (1, 3, 518)
    assert torch.equal(features[0, :, :NUM_EVENTS], F.one_hot(events[0], NUM_EVENTS).float())
    # position 0 predicts step n=1, position 1 n=2, position 2 n=3; bit k is +1 where (n >> k) & 1
    assert features[0, :, NUM_EVENTS:].tolist() == [
        [1, -1, -1, -1, -1, -1],
        [-1, 1, -1, -1, -1, -1],
        [1, 1, -1, -1, -1, -1],
    ]


def test_counter_wraps_after_64_steps():
    counter = input_features(torch.zeros(1, 64, dtype=torch.long))[0, :, NUM_EVENTS:]
    assert counter[62].tolist() == [1] * 6  # n = 63
    assert counter[63].tolist() == [-1] * 6  # n = 64


def test_start_continues_the_positions_of_a_sequence():
    events = torch.randint(0, NUM_EVENTS, (2, 40))
    assert torch.equal(input_features(events[:, 5:], start=5), input_features(events)[:, 5:])
    per_sequence = input_features(events[:, :3], start=torch.tensor([0, 5]))
    assert torch.equal(per_sequence[0], input_features(events[:1, :3])[0])
    assert torch.equal(per_sequence[1], input_features(events[1:, :3], start=5)[0])


@pytest.mark.parametrize('attention_length', [0, 4])
def test_forward_gives_logits_per_step_and_a_state_per_layer(attention_length):
    model = DrumRNN(hidden_size=16, num_layers=3, attention_length=attention_length)
    logits, state = model(torch.randint(0, NUM_EVENTS, (2, 5)))
    assert logits.shape == (2, 5, NUM_EVENTS)
    assert len(state) == 3


@pytest.mark.parametrize('attention_length', [0, 4])
def test_stepping_with_the_state_equals_the_whole_sequence(attention_length):
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=16, num_layers=2, attention_length=attention_length).eval()
    events = torch.randint(0, NUM_EVENTS, (3, 12))
    whole, _ = model(events)
    state, chunks = None, []
    for begin, end in [(0, 1), (1, 2), (2, 7), (7, 12)]:
        logits, state = model(events[:, begin:end], state, start=begin)
        chunks.append(logits)
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole)


def test_input_gates_are_the_weight_times_the_input_features():
    weight, bias = torch.randn(12, NUM_INPUTS), torch.randn(12)
    events = torch.randint(0, NUM_EVENTS, (3, 9))
    expected = F.linear(input_features(events, start=7), weight, bias).transpose(0, 1)
    torch.testing.assert_close(input_gates(weight, bias, events, start=7), expected)


def tf_attention_cell_wrapper(layer: AttentionLSTM, events: torch.Tensor) -> torch.Tensor:
    """A literal transcription of tf.contrib.rnn.AttentionCellWrapper.call around an LSTM cell."""
    batch, hidden, length = events.shape[0], layer.hidden_size, layer.length
    h = c = attns = torch.zeros(batch, hidden)
    attn_states = torch.zeros(batch, length, hidden)
    outputs = []
    for inputs in input_features(events).unbind(1):
        inputs = layer.mix_input(torch.cat([inputs, attns], 1))  # _linear1([inputs, attns])
        h, c = layer.cell(inputs, (h, c))
        hidden_features = layer.key(attn_states)  # conv2d(hidden, attn_w), 1x1
        y = layer.query(torch.cat([c, h], 1))  # _linear3(concat(flatten(LSTMStateTuple(c, h))))
        s = (layer.score.weight[0] * torch.tanh(hidden_features + y[:, None])).sum(-1)
        a = torch.softmax(s, -1)
        attns = (a[..., None] * attn_states).sum(1)
        output = layer.mix_output(torch.cat([h, attns], 1))  # _linear2([cell_output, new_attns])
        attn_states = torch.cat([attn_states[:, 1:], output[:, None]], 1)
        outputs.append(output)
    return torch.stack(outputs)


def test_attention_layer_computes_tf_attention_cell_wrapper():
    torch.manual_seed(0)
    layer = AttentionLSTM(hidden_size=8, length=3)
    events = torch.randint(0, NUM_EVENTS, (2, 7))
    output, _ = layer(events)
    torch.testing.assert_close(output, tf_attention_cell_wrapper(layer, events))


def test_a_small_model_learns_a_repeated_bar():
    torch.manual_seed(0)
    bar = torch.tensor([1, 0, 4, 0, 5, 0, 4, 0, 1, 1, 4, 0, 5, 0, 4, 2])
    events = bar.repeat(3)[None]
    model = DrumRNN(hidden_size=32, num_layers=1, dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(100):
        logits, _ = model(events[:, :-1])
        loss = F.cross_entropy(logits[0], events[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 5 and losses[-1] < 0.1


def test_sample_starts_with_the_primer_and_has_the_requested_length():
    model = DrumRNN(hidden_size=16, num_layers=2)
    primer = torch.tensor([1, 0, 4])
    events = sample(model, primer, num_steps=20)
    assert events.shape == (20,)
    assert torch.equal(events[:3], primer)
    assert ((events >= 0) & (events < NUM_EVENTS)).all()


@pytest.mark.parametrize('attention_length', [0, 4])
def test_sample_is_deterministic_for_a_seeded_generator_and_keeps_train_mode(attention_length):
    model = DrumRNN(hidden_size=16, num_layers=2, attention_length=attention_length).train()
    draws = [sample(model, torch.tensor([1]), 30, temperature=1.5, generator=torch.Generator().manual_seed(3))
             for _ in range(2)]
    assert torch.equal(*draws)
    assert model.training


def test_low_temperature_samples_the_most_likely_event():
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=16, num_layers=1)
    primer = torch.tensor([1, 4])
    events = sample(model, primer, 3, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model.eval()(primer[None])
    assert events[-1] == logits[0, -1].argmax()


@pytest.mark.parametrize('temperature', [0.0, -1.0])
def test_temperature_must_be_positive(temperature):
    with pytest.raises(ValueError, match='generate.temperature'):
        sample(DrumRNN(hidden_size=8, num_layers=1), torch.tensor([1]), 4, temperature=temperature)


def hand_made_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Four steps whose predictions are events 0, 3, 3, 0 against labels 0, 3, 5, 7 (two right)."""
    logits = torch.zeros(1, 4, NUM_EVENTS)
    for step, predicted in enumerate([0, 3, 3, 0]):
        logits[0, step, predicted] = 10.0
    return logits, torch.tensor([[0, 3, 5, 7]])


def test_metrics_count_right_predictions_on_events_and_silences():
    logits, labels = hand_made_logits()
    sums = sequence_metrics(logits, labels)
    counts = {key: int(value) for key, value in sums.items() if key != 'loss_sum'}
    assert counts == {'count': 4, 'correct': 2, 'event_count': 3, 'event_correct': 1,
                      'no_event_count': 1, 'no_event_correct': 1}
    metrics = finalize_metrics(sums)
    expected_loss = F.cross_entropy(logits[0], labels[0]).item()
    assert metrics['loss'] == pytest.approx(expected_loss)
    assert metrics['perplexity'] == pytest.approx(math.exp(expected_loss))
    assert (metrics['accuracy'], metrics['event_accuracy'], metrics['no_event_accuracy']) == (0.5, 1 / 3, 1.0)


def test_metrics_skip_ignored_labels_and_masked_positions():
    logits, labels = hand_made_logits()
    ignored = sequence_metrics(logits, torch.tensor([[0, 3, -100, -100]]))
    masked = sequence_metrics(logits, labels, mask=torch.tensor([[True, True, False, False]]))
    for sums in (ignored, masked):
        assert finalize_metrics(sums)['accuracy'] == 1.0
        assert int(sums['count']) == 2


def test_metrics_of_a_batch_that_skips_nothing_are_bitwise_those_of_the_gathered_positions():
    # A training batch keeps every position, and then the positions are not gathered (nor their
    # gradient scattered back): the loss and its gradient must be the very bits of the gathered path.
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 63, NUM_EVENTS, generator=generator)
    labels = torch.randint(0, NUM_EVENTS, (4, 63), generator=generator)
    fast, gathered = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = sequence_metrics(fast, labels)['loss_sum']
    keep = torch.ones(4 * 63, dtype=torch.bool)
    reference = F.cross_entropy(gathered.reshape(-1, NUM_EVENTS)[keep], labels.reshape(-1)[keep], reduction='sum')
    loss.backward()
    reference.backward()
    assert torch.equal(loss, reference) and torch.equal(fast.grad, gathered.grad)


def test_metrics_add_up_over_batches():
    logits, labels = hand_made_logits()
    halves = [sequence_metrics(logits[:, :2], labels[:, :2]), sequence_metrics(logits[:, 2:], labels[:, 2:])]
    totals = {key: sum(float(half[key]) for half in halves) for key in halves[0]}
    assert finalize_metrics(totals) == pytest.approx(finalize_metrics(sequence_metrics(logits, labels)))


@pytest.mark.parametrize('attention_length', [0, 4])
def test_a_bfloat16_autocast_forward_gives_the_float32_loss_to_within_a_percent(attention_length):
    torch.manual_seed(0)
    model = DrumRNN(hidden_size=64, num_layers=3, attention_length=attention_length).eval()
    events = torch.randint(0, NUM_EVENTS, (8, 33))
    inputs, labels = events[:, :-1], events[:, 1:].reshape(-1)
    with torch.no_grad():
        exact = F.cross_entropy(model(inputs)[0].reshape(-1, NUM_EVENTS), labels)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(inputs)[0]
    assert logits.dtype == torch.bfloat16  # the matmuls really ran in bfloat16
    low = F.cross_entropy(logits.float().reshape(-1, NUM_EVENTS), labels)
    assert float(low) == pytest.approx(float(exact), rel=0.01) and float(low) != float(exact)
