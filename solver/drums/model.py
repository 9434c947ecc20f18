"""Magenta's Drums RNN ("drum_kit") in PyTorch: inputs, the network, sampling and metrics.

The input at step i is Magenta's `LookbackEventSequenceEncoderDecoder(MultiDrumOneHotEncoding(),
lookback_distances=[], binary_counter_bits=6)`: the one-hot event (512) then 6 binary counter
features of n = i + 1, the position of the step being predicted. The label at step i is event i + 1.

The network is Magenta's `make_rnn_cell`: stacked LSTM layers (BasicLSTMCell, forget bias 1), each
wrapped in `DropoutWrapper(output_keep_prob)`, optionally with `AttentionCellWrapper` on the first
layer, then a linear layer to the 512 event logits. Weights use PyTorch's default initialisation.
"""

from __future__ import annotations

import math
import typing as tp
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

NUM_EVENTS = 512  # 2**9 drum-class sets; the same as encoding.NUM_EVENTS
COUNTER_BITS = 6
NUM_INPUTS = NUM_EVENTS + COUNTER_BITS
NO_EVENT = 0  # the silent step, Magenta's default event label
IGNORE_INDEX = -100  # a label to skip, as torch's cross_entropy expects

LayerState = tuple[Tensor, ...]
State = tuple[LayerState, ...]  # one entry per layer, as that layer returns it


def _counter(events: Tensor, start: int | Tensor) -> Tensor:
    """The 6 binary counter features `[B or 1, T, 6]` of n = position + 1, as +1.0 / -1.0."""
    steps = torch.arange(events.shape[-1], device=events.device)
    start = torch.as_tensor(start, device=events.device).reshape(-1, 1)
    n = start + steps + 1  # the position of the event being predicted
    bits = (n[..., None] >> torch.arange(COUNTER_BITS, device=events.device)) & 1
    return (bits * 2 - 1).float()


def input_features(events: Tensor, start: int | Tensor = 0) -> Tensor:
    """Float `[B, T, 518]` inputs for events `[B, T]` at positions `start + t`.

    `start` (an int, or a tensor of one start per sequence) lets a caller continue a sequence.
    """
    counter = _counter(events, start).expand(*events.shape, COUNTER_BITS)
    return torch.cat([F.one_hot(events, NUM_EVENTS).float(), counter], dim=-1)


def input_gates(weight: Tensor, bias: Tensor, events: Tensor, start: int | Tensor = 0) -> Tensor:
    """`F.linear(input_features(events, start), weight, bias)`, time-major `[T, B, out]`.

    The one-hot part of the product is a column lookup, so the 518-d inputs are never built and
    their needless gradient never computed.
    """
    counter = F.linear(_counter(events, start), weight[:, NUM_EVENTS:], bias).transpose(0, 1)
    return F.embedding(events.t(), weight[:, :NUM_EVENTS].t()) + counter


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    # Inverted dropout, as F.dropout, but the mask is drawn with rand: CPU bernoulli_ is 2.5 times
    # slower, and took 14% of a drum_kit training step (B=128, T=128) where this takes 5%.
    if not training or p == 0:
        return x
    return x * ((torch.rand_like(x) >= p).to(x.dtype) / (1 - p))


def _add_forget_bias(lstm: nn.LSTM | nn.LSTMCell) -> None:
    # TF's BasicLSTMCell adds 1.0 to the forget gate; torch's gate order is (input, forget, cell, output).
    size = lstm.hidden_size
    with torch.no_grad():
        for name, bias in lstm.named_parameters():
            if name.startswith('bias_ih'):
                bias[size:2 * size] += 1.0


class EventLSTM(nn.Module):
    """The first layer: a fused nn.LSTM on `input_features`; the state is nn.LSTM's `(h, c)`.

    Computing its input gates by `input_gates` (a lookup) needs a Python-loop LSTM instead: same
    maths, 17-23% less CPU time on one thread, but twice slower when other processes hold the CPUs
    (two OpenMP threads synchronise on every small op), so the fused kernel stays.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.lstm = nn.LSTM(NUM_INPUTS, hidden_size)
        _add_forget_bias(self.lstm)

    def forward(self, events: Tensor, start: int | Tensor = 0,
                state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        output, (h, c) = self.lstm(input_features(events, start).transpose(0, 1), state)
        return output, (h, c)


class AttentionLSTM(nn.Module):
    """The first LSTM layer inside TF's `AttentionCellWrapper`, on events, one step at a time.

    Each step mixes the previous attention read into the input (`[x; attn] -> input_size`), runs
    the cell, attends (Bahdanau, from the new `[c; h]`) over a window of the last `length` outputs
    (zeros at first), and outputs `linear([h; attn])`, which then enters the window. The state is
    `(h, c, attn, window)`. The window keys are kept as the window slides instead of re-projected,
    and the input mixing is folded into the cell's input weights: the same function, fewer flops.
    """

    def __init__(self, hidden_size: int, length: int, input_size: int = NUM_INPUTS):
        super().__init__()
        self.length = length
        self.hidden_size = hidden_size
        self.mix_input = nn.Linear(input_size + hidden_size, input_size)
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size, bias=False)  # TF's 1x1 conv `attn_w`
        self.query = nn.Linear(2 * hidden_size, hidden_size)
        self.score = nn.Linear(hidden_size, 1, bias=False)  # TF's `attn_v`
        self.mix_output = nn.Linear(2 * hidden_size, hidden_size)
        _add_forget_bias(self.cell)

    def initial_state(self, batch: int, like: Tensor) -> LayerState:
        zeros = like.new_zeros(batch, self.hidden_size)
        return zeros, zeros, zeros, like.new_zeros(batch, self.length, self.hidden_size)

    def forward(self, events: Tensor, start: int | Tensor = 0,
                state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        cell = self.cell
        h, c, attn, window = self.initial_state(len(events), cell.weight_hh) if state is None else state
        w_x, w_attn = self.mix_input.weight.split([cell.input_size, self.hidden_size], dim=1)
        bias = cell.weight_ih @ self.mix_input.bias + cell.bias_ih + cell.bias_hh
        gates_x = input_gates(cell.weight_ih @ w_x, bias, events, start)
        w_recurrent = torch.cat([cell.weight_ih @ w_attn, cell.weight_hh], dim=1)
        keys = self.key(window)
        outputs = []
        for step_gates in gates_x.unbind(0):  # unbind: indexing in the loop makes backward quadratic
            gates = torch.addmm(step_gates, torch.cat([attn, h], dim=1), w_recurrent.t())
            i, f, g, o = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            query = self.query(torch.cat([c, h], dim=1))
            weights = self.score(torch.tanh(keys + query[:, None])).squeeze(-1).softmax(-1)
            attn = torch.bmm(weights[:, None], window).squeeze(1)
            output = self.mix_output(torch.cat([h, attn], dim=1))
            window = torch.cat([window[:, 1:], output[:, None]], dim=1)
            keys = torch.cat([keys[:, 1:], self.key(output)[:, None]], dim=1)
            outputs.append(output)
        return torch.stack(outputs), (h, c, attn, window)


class DrumRNN(nn.Module):
    """Stacked LSTM over drum events; `forward` returns next-event logits and the state.

    The first layer is an `EventLSTM` (an `AttentionLSTM` when `attention_length > 0`); the others
    are fused `nn.LSTM`s. Dropout follows every layer, as Magenta's DropoutWrapper. Inside, the
    layers run time-major, the layout of torch's CPU LSTM kernels.
    """

    def __init__(self, hidden_size: int = 256, num_layers: int = 3, dropout: float = 0.5,
                 attention_length: int = 0):
        super().__init__()
        if num_layers < 1 or hidden_size < 1:
            raise ValueError(f"model.num_layers and model.hidden_size must be >= 1, "
                             f"got {num_layers} and {hidden_size}")
        if not 0 <= dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
        if attention_length < 0:
            raise ValueError(f"model.attention_length must be >= 0 (0: no attention), got {attention_length}")
        self.dropout = dropout
        self.first = AttentionLSTM(hidden_size, attention_length) if attention_length else EventLSTM(hidden_size)
        layers = [nn.LSTM(hidden_size, hidden_size) for _ in range(num_layers - 1)]
        for lstm in layers:
            _add_forget_bias(lstm)
        self.layers = nn.ModuleList(layers)
        self.output = nn.Linear(hidden_size, NUM_EVENTS)

    def forward(self, events: Tensor, state: State | None = None,
                start: int | Tensor = 0) -> tuple[Tensor, State]:
        """Logits `[B, T, 512]` for events `[B, T]` at positions `start + t`, and the new state.

        Pass the returned state and `start + T` to continue the same sequences.
        """
        states = state if state is not None else (None,) * (1 + len(self.layers))
        x, first_state = self.first(events, start, states[0])
        new_state = [first_state]
        for layer, layer_state in zip(self.layers, states[1:]):
            x, layer_state = layer(_dropout(x, self.dropout, self.training), layer_state)
            new_state.append(tuple(layer_state))
        x = _dropout(x, self.dropout, self.training)
        return self.output(x.transpose(0, 1)), tuple(new_state)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def select_state(model: nn.Module, state: State, index: Tensor) -> State:
    """The state of the sequences `index` of a batch (a beam's survivors or its branches).

    The first layer's state is batch-first when it is an `AttentionLSTM`, otherwise each layer's
    is nn.LSTM's `[1, B, H]`; a wrapper's `.module` (DDP) is looked through.
    """
    inner = getattr(model, 'module', model)
    first_dim = 0 if isinstance(inner.first, AttentionLSTM) else 1
    return tuple(tuple(t.index_select(first_dim if layer == 0 else 1, index) for t in layer_state)
                 for layer, layer_state in enumerate(state))


def beam_search(model: nn.Module, primer: Tensor, num_steps: int, temperature: float = 1.0,
                generator: torch.Generator | None = None, beam_size: int = 1, branch_factor: int = 1,
                steps_per_iteration: int = 1) -> tuple[Tensor, float]:
    """`num_steps` events starting with `primer` (events `[P]`), and their log-likelihood, by
    Magenta's `beam_search` (note_seq `sequence_generator`).

    `beam_size` copies of the primer are first extended by `(n - 1) % steps_per_iteration + 1`
    sampled steps (n: the steps to generate); then each iteration copies every beam
    `branch_factor` times, extends each copy by `steps_per_iteration` sampled steps and keeps
    the `beam_size` most likely. The sequence with the highest log-likelihood is returned. Each
    step draws from softmax(logits / temperature) with `generator`, and the log-likelihood is
    summed under that same distribution, as Magenta's. 1/1/1 is plain sampling.
    """
    if not temperature > 0:
        raise ValueError(f"generate.temperature must be > 0, got {temperature}")
    if primer.dim() != 1 or len(primer) == 0:
        raise ValueError(f"the primer must be a non-empty 1-d tensor of events, got shape {tuple(primer.shape)}")
    if num_steps < len(primer):
        raise ValueError(f"generate.num_steps ({num_steps}) is shorter than the primer ({len(primer)} steps)")
    for name, value in (('beam_size', beam_size), ('branch_factor', branch_factor),
                        ('steps_per_iteration', steps_per_iteration)):
        if value < 1:
            raise ValueError(f"generate.{name} must be an integer >= 1, got {value}")
    to_generate = num_steps - len(primer)
    with torch.no_grad(), _eval_mode(model):
        logits, state = model(primer[None])
        beams = _Beams(primer[None], logits[:, -1], state, torch.zeros(1, dtype=torch.float64))
        beams = beams.select(model, torch.zeros(beam_size, dtype=torch.long, device=primer.device))
        if to_generate == 0:
            return primer, 0.0
        first = (to_generate - 1) % steps_per_iteration + 1
        beams = beams.extend(model, first, num_steps, temperature, generator)
        while beams.events.shape[1] < num_steps:
            beams = beams.best(model, beam_size)
            branches = torch.arange(len(beams.scores), device=primer.device).repeat_interleave(branch_factor)
            beams = beams.select(model, branches).extend(model, steps_per_iteration, num_steps, temperature,
                                                         generator)
        best = int(beams.scores.argmax())
        return beams.events[best], float(beams.scores[best])


class _Beams(tp.NamedTuple):
    """Sequences `[B, T]` under search, the logits of their next event, the network's state and
    the log-likelihood of the sampled steps of each."""

    events: Tensor
    logits: Tensor
    state: State
    scores: Tensor

    def select(self, model: nn.Module, index: Tensor) -> _Beams:
        return _Beams(self.events[index], self.logits[index], select_state(model, self.state, index),
                      self.scores[index.to(self.scores.device)])

    def best(self, model: nn.Module, k: int) -> _Beams:
        """The `k` most likely, most likely first (Magenta's `_prune_branches`)."""
        return self.select(model, self.scores.topk(min(k, len(self.scores))).indices.to(self.events.device))

    def extend(self, model: nn.Module, steps: int, num_steps: int, temperature: float,
               generator: torch.Generator | None) -> _Beams:
        """Each sequence extended by `steps` sampled events (fewer at `num_steps`)."""
        events, logits, state, scores = self
        for _ in range(min(steps, num_steps - events.shape[1])):
            tempered = logits.float() / temperature
            probs = torch.softmax(tempered, dim=-1)
            if generator is not None:
                probs = probs.to(generator.device)
            drawn = torch.multinomial(probs, 1, generator=generator).to(events.device)
            scores = scores + torch.log_softmax(tempered, dim=-1).gather(1, drawn)[:, 0].double().to(scores.device)
            position = events.shape[1]
            events = torch.cat([events, drawn], dim=1)
            if position + 1 < num_steps:
                step_logits, state = model(drawn, state, start=position)
                logits = step_logits[:, -1]
        return _Beams(events, logits, state, scores)


def sample(model: nn.Module, primer: Tensor, num_steps: int, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """A sequence of `num_steps` events that starts with `primer` (events `[P]`), as Magenta's generate.

    The primer runs through the network once, then each step draws from softmax(logits / temperature)
    with `generator` and feeds the drawn event with the carried state: `beam_search` with 1/1/1.
    Runs in eval mode, no grad.
    """
    return beam_search(model, primer, num_steps, temperature, generator)[0]


def sequence_metrics(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Summed counts behind Magenta's metrics, to add up over batches and pass to `finalize_metrics`.

    `logits` is `[..., 512]`, `labels` `[...]`. Positions whose label is -100, or where the boolean
    `mask` is False (True marks the positions to count), are skipped. `loss_sum` keeps its graph.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    if mask is not None:
        keep = keep & mask.reshape(-1).bool()
    if not bool(keep.all()):  # a training batch skips nothing: no gather, and no scatter in backward
        logits, labels = logits[keep], labels[keep]
    correct = logits.argmax(-1) == labels
    event = labels != NO_EVENT
    return {
        'loss_sum': F.cross_entropy(logits.float(), labels, reduction='sum'),
        'count': keep.sum(),
        'correct': correct.sum(),
        'event_count': event.sum(),
        'event_correct': (correct & event).sum(),
        'no_event_count': (~event).sum(),
        'no_event_correct': (correct & ~event).sum(),
    }


WINDOW_KEYS = ('loss_sum', 'count', 'correct', 'event_count', 'event_correct', 'no_event_count',
               'no_event_correct', 'later_correct', 'later_count')


def window_counts(logits: Tensor, labels: Tensor, later: Tensor) -> Tensor:
    """`sequence_metrics`' counts for each sequence of a batch, `[B, len(WINDOW_KEYS)]` float64, no
    graph: for statistics over windows (a bootstrap). `later` (`[B, T]` bool) marks the positions
    whose `later_correct`/`later_count` are counted. Their sum over B is `sequence_metrics`' counts.
    """
    keep = labels != IGNORE_INDEX
    nll = F.cross_entropy(logits.detach().transpose(1, 2).float(), labels.masked_fill(~keep, 0), reduction='none')
    correct = (logits.argmax(-1) == labels) & keep
    event = (labels != NO_EVENT) & keep
    silent = keep & ~event
    later = later & keep
    columns = (nll * keep, keep, correct, event, correct & event, silent, correct & silent, correct & later, later)
    return torch.stack([column.double().sum(1) for column in columns], dim=1)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def finalize_metrics(sums: Mapping[str, float | Tensor]) -> dict[str, float]:
    """Magenta's loss, perplexity and accuracies from summed counts; NaN where a count is zero."""
    s = {key: float(value) for key, value in sums.items()}
    loss = _ratio(s['loss_sum'], s['count'])
    return {
        'loss': loss,
        'perplexity': math.exp(min(loss, 700.0)),  # NaN stays NaN; no OverflowError
        'accuracy': _ratio(s['correct'], s['count']),
        'event_accuracy': _ratio(s['event_correct'], s['event_count']),
        'no_event_accuracy': _ratio(s['no_event_correct'], s['no_event_count']),
    }
