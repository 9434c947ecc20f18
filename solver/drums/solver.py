"""DrumRNNSolver: Magenta's Drums RNN (drum_kit) trained and sampled on the StandardSolver."""

from __future__ import annotations

import logging
import math
import typing as tp
from pathlib import Path

import numpy as np
import torch

from .. import builders, distrib, locations, validation
from ..base import StandardSolver
from ..errors import ConfigError, SolverError
from . import audio, data, groove, midi
from .bootstrap import intervals, replicate_sums
from .encoding import NUM_EVENTS, STEPS_PER_BAR, parse_drum_steps, pitches_to_event
from .model import WINDOW_KEYS, DrumRNN, beam_search, finalize_metrics, sequence_metrics, window_counts

logger = logging.getLogger(__name__)
KICK = pitches_to_event([36])


def resolve_path(value: str | Path) -> Path:
    """A config path: from the launch directory, else the project's root, else the framework's
    shipped files (data/drums, the bundled corpus) (`solver.locations.find`)."""
    return locations.find(value)


CI_METRICS = ('loss', 'perplexity', 'accuracy', 'accuracy_from_bar_2')  # evaluate's, with a 95% interval


def split_summary(totals: dict[str, float]) -> dict[str, float]:
    """Magenta's metrics and `accuracy_from_bar_2` from a split's summed counts."""
    metrics = finalize_metrics(totals)
    metrics['accuracy_from_bar_2'] = totals['later_correct'] / max(totals['later_count'], 1.0)
    return metrics


SEARCH_KEYS = ('beam_size', 'branch_factor', 'steps_per_iteration')  # Magenta's beam search flags
AUTOCAST = (None, 'bfloat16')  # optim.autocast: the precision of the training forward


def primer_drums(cfg: tp.Any) -> np.ndarray | None:
    """The events of `generate.primer_drums` (Magenta's "[(36,),(),(42,)]"), None if unset; a
    ConfigError naming the key if the value is not that syntax or longer than generate.num_steps."""
    value = cfg.generate.get('primer_drums')
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"generate.primer_drums={value!r}: give it as a quoted string, one tuple of MIDI "
                          f"pitches per step: 'generate.primer_drums=\"[(36,),(),(42,)]\"'.")
    try:
        events = parse_drum_steps(value)
    except ValueError as err:
        raise ConfigError(f"generate.primer_drums={value!r}: {err}.") from None
    if len(events) > cfg.generate.num_steps:
        raise ConfigError(f"generate.primer_drums has {len(events)} steps, more than generate.num_steps="
                          f"{cfg.generate.num_steps}; ask for more steps or give a shorter primer.")
    return events


class DrumRNNSolver(StandardSolver):
    best_metric_name = 'loss'

    @classmethod
    def check_config(cls, cfg: tp.Any) -> None:
        """generate.* is used only after a whole epoch: refuse what cannot work before training."""
        validation.number(cfg, 'generate.temperature', "a number > 0 (1.0 samples the model's "
                          "distribution; lower is more conservative)", lambda v: v > 0)
        if cfg.optim.get('autocast') not in AUTOCAST:
            raise ConfigError(f"optim.autocast={cfg.optim.autocast!r} cannot work: give null (float32) or "
                              f"bfloat16 (the training forward in bfloat16, weights and Adam in float32).")
        for key in SEARCH_KEYS:
            validation.number(cfg, f'generate.{key}', 'an integer >= 1 (1/1/1: plain sampling)',
                              lambda v: v >= 1, integer=True, optional=True)
        primer_drums(cfg)
        if cfg.generate.primer and cfg.generate.get('primer_drums'):
            raise ConfigError(f"generate.primer={cfg.generate.primer} and generate.primer_drums are both set; "
                              f"give one primer (the other null).")
        if cfg.generate.primer and not resolve_path(cfg.generate.primer).is_file():
            raise ConfigError(f"generate.primer={cfg.generate.primer}: no such MIDI file "
                              f"(looked at {resolve_path(cfg.generate.primer)}); give a .mid file or null.")

    def build_dataloaders(self) -> None:
        cfg = self.cfg.dataset
        try:
            self.corpus = data.load_corpus(resolve_path(cfg.path), min_bars=cfg.min_bars,
                                           window_steps=cfg.window_steps, fractions=tuple(cfg.splits),
                                           cache=self.data_cache)
        except ValueError as err:  # no usable data, or dataset.* values that cannot work
            raise SolverError(str(err)) from err
        logger.info("%s", self.corpus.summary())
        for split in ('valid', 'evaluate'):
            if not self.corpus.windows[split]:
                raise SolverError(f"dataset.splits={list(cfg.splits)} gives the {split} split no data; "
                                  f"give it a non-zero fraction.")
        self.dataloaders['train'] = builders.get_train_loader(
            self.corpus.dataset('train'), self.cfg, seed=self.cfg.seed, collate_fn=data.collate)
        for split in ('valid', 'evaluate'):
            self.dataloaders[split] = builders.get_eval_loader(
                self.corpus.dataset(split), self.cfg, collate_fn=data.collate)
        self.unigram = torch.from_numpy(data.event_frequencies(self.corpus.windows['train'])).double()

    def build_model(self) -> None:
        cfg = self.cfg.model
        model = DrumRNN(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout,
                        attention_length=cfg.attention_length).to(self.device)
        self.model = self.distribute(model, units=model.layers)
        self.optimizer = builders.get_optimizer(self.model.parameters(), self.cfg.optim)
        self.register_stateful('model', 'optimizer')
        self.register_best_state('model')
        self.register_ema('model')

    # -- train and valid ------------------------------------------------------------------------

    def run_step(self, idx: int, batch: tp.Any, metrics: dict[str, float]) -> dict[str, float]:
        inputs, targets = (t.to(self.device) for t in data.next_step_targets(batch))
        # optim.autocast=bfloat16: the LSTM and output matmuls in bfloat16 (oneDNN's kernels),
        # the loss, weights, gradients and Adam in float32; valid and evaluate stay float32.
        low = self.is_training and self.cfg.optim.get('autocast') == 'bfloat16'
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=low):
            logits, _ = self.model(inputs)
        sums = sequence_metrics(logits, targets)
        loss = sums['loss_sum'] / sums['count']
        if self.is_training:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.optim.max_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_norm)
            self.optimizer.step()
        return finalize_metrics({key: value.detach() for key, value in sums.items()})

    def valid(self) -> dict[str, float]:
        return self.split_metrics('valid')

    @torch.no_grad()
    def split_metrics(self, split: str, bootstrap: bool = False) -> dict[str, float]:
        """Magenta's metrics over a whole split, from summed counts (exact, not batch averages).

        `accuracy_from_bar_2` counts only labels from the second bar of each window on: the
        positions where the repeat-the-last-bar baseline is defined, for a like-for-like comparison.
        With `bootstrap`, each metric gets a 95% interval (`<name>_ci_low`, `_ci_high`) from a
        bootstrap over the split's windows (`bootstrap.py`).
        """
        self.model.eval()
        totals: dict[str, float] = {}
        rows = []
        for batch in self.dataloaders[split]:
            self.check_stop()  # a preemption signal stops the stage here
            inputs, targets = (t.to(self.device) for t in data.next_step_targets(batch))
            logits, _ = self.model(inputs)
            later = torch.arange(targets.shape[1], device=targets.device)[None] >= STEPS_PER_BAR - 1
            counts = sequence_metrics(logits, targets)
            later_counts = sequence_metrics(logits, targets, mask=later.expand_as(targets))
            counts.update(later_correct=later_counts['correct'], later_count=later_counts['count'])
            for key, value in counts.items():
                totals[key] = totals.get(key, 0.0) + float(value)
            if bootstrap:  # the same counts, window by window
                rows.append(window_counts(logits, targets, later.expand_as(targets)))
        self.model.train()
        totals = distrib.sum_metrics(totals)
        metrics = split_summary(totals)
        if bootstrap:
            table = torch.cat(rows).cpu() if rows else torch.zeros(0, len(WINDOW_KEYS))
            replicates = replicate_sums(table, WINDOW_KEYS, seed=self.cfg.seed)
            metrics.update(intervals(replicates, split_summary, CI_METRICS))
        return metrics

    # -- evaluate: the model beside two baselines --------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        metrics = self.split_metrics('evaluate', bootstrap=True)
        metrics.update(self.baselines(self.corpus.windows['evaluate']))
        return metrics

    def baselines(self, windows: list[np.ndarray]) -> dict[str, float]:
        """'Repeat the event one bar earlier' accuracy and the train split's unigram perplexity."""
        probs = (self.unigram + 1) / (self.unigram.sum() + NUM_EVENTS)  # add-one smoothing
        nll, count, repeat_correct, repeat_count = 0.0, 0, 0, 0
        for window in windows:
            labels = torch.from_numpy(window[1:].astype(np.int64))
            nll -= probs[labels].log().sum().item()
            count += len(labels)
            repeat_correct += int((window[STEPS_PER_BAR:] == window[:-STEPS_PER_BAR]).sum())
            repeat_count += max(0, len(window) - STEPS_PER_BAR)
        return {'baseline_unigram_perplexity': math.exp(nll / max(count, 1)),
                'baseline_repeat_bar_accuracy': repeat_correct / max(repeat_count, 1)}

    # -- generate: MIDI files, piano rolls and WAV previews ------------------------------------

    def primer(self) -> tuple[torch.Tensor, float | None]:
        """The primer events (`generate.primer_drums`, else the first `generate.primer_bars` bars of
        `generate.primer`, else one kick) and the primer file's tempo (None without a file)."""
        cfg = self.cfg.generate
        listed = primer_drums(self.cfg)
        if listed is not None:
            return torch.from_numpy(listed), None
        if not cfg.primer:
            return torch.tensor([KICK]), None
        try:
            track = midi.read_drum_track(resolve_path(cfg.primer))
        except midi.DrumFileError as err:
            raise SolverError(f"generate.primer={cfg.primer}: {err.reason}; give a drum MIDI file with "
                              "at least one bar in 4/4 on channel 10.") from err
        steps = int(cfg.get('primer_bars', 1)) * STEPS_PER_BAR
        return torch.from_numpy(track.sections[0][:steps].astype(np.int64)), track.qpm

    def samples_folder(self) -> Path:
        """samples/epoch_<N>/ during training; samples/generate_<K>/ (the next free K) on demand,
        so that `execute_only=generate` never overwrites what training wrote."""
        root = self.folder / 'samples'
        if self.cfg.execute_only != 'generate':
            return root / f'epoch_{self.epoch}'
        taken = {p.name for p in root.glob('generate_*')} if root.exists() else set()
        return root / next(f'generate_{k:03d}' for k in range(len(taken) + 1) if f'generate_{k:03d}' not in taken)

    def generate(self) -> dict[str, float]:
        """Sample `generate.num_samples` tracks; write each as MIDI, a piano-roll PNG and a WAV, and
        the groove report of all of them against the evaluate split.

        Each sample starts with the primer and is chosen by Magenta's beam search (generate.beam_size,
        branch_factor, steps_per_iteration; 1/1/1 samples plainly). Every rank samples the same
        tracks (a sharded model needs all ranks for a forward); rank 0 writes them.
        """
        cfg = self.cfg.generate
        writes = distrib.is_rank_zero()
        folder = self.samples_folder()
        if writes:
            folder.mkdir(parents=True, exist_ok=True)
        # A generator of its own, so that sampling never shifts the training RNG streams.
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch)
        primer, primer_qpm = self.primer()
        if cfg.num_steps < len(primer):
            raise SolverError(f"generate.num_steps={cfg.num_steps} is shorter than the primer "
                              f"({len(primer)} steps); ask for more steps or fewer generate.primer_bars.")
        qpm = float(cfg.qpm or primer_qpm or 120.0)
        search = {key: int(cfg.get(key) or 1) for key in SEARCH_KEYS}
        samples, log_likelihoods, renderers = [], [], set()
        for index in range(cfg.num_samples):
            self.check_stop()
            events_t, log_likelihood = beam_search(self.model, primer.to(self.device), cfg.num_steps,
                                                   cfg.temperature, generator=generator, **search)
            events = events_t.cpu().numpy()
            samples.append(events)
            log_likelihoods.append(log_likelihood / max(cfg.num_steps - len(primer), 1))
            if writes:
                renderers |= self.write_sample(events, folder, f'sample_{index:02d}', qpm)
        metrics = {'log_likelihood_per_step': float(np.mean(log_likelihoods))}  # groove_hit_steps: the density
        report = groove.groove_report(samples, self.corpus.sections['evaluate'])
        metrics.update(groove.report_metrics(report))
        if writes:
            groove.write_report(report, folder / 'groove.json')
            groove.plot_report(report, folder / 'groove.png', title=f'{self.xp.sig} {folder.name}')
            logger.info("Wrote %d samples to %s (MIDI, piano roll%s; %d steps at %g qpm, T=%g, beam %s); "
                        "groove distance to the evaluate split %.3f (groove.json, groove.png)",
                        cfg.num_samples, folder, f", WAV by {'/'.join(sorted(renderers))}" if renderers else '',
                        cfg.num_steps, qpm, cfg.temperature, '/'.join(str(v) for v in search.values()),
                        report['distance'])
        return metrics

    def write_sample(self, events: np.ndarray, folder: Path, name: str, qpm: float) -> set[str]:
        """`<name>.mid`, `.png` (piano roll) and `.wav` (preview) in `folder`; with TensorBoard, the
        piano roll and the preview there too (Images and Audio tabs, step = epoch). Returns the
        renderer of the preview (none without generate.wav)."""
        cfg = self.cfg.generate
        midi.write_drum_midi(events, folder / f'{name}.mid', qpm=qpm)
        midi.save_piano_roll(events, folder / f'{name}.png',
                             title=f'{self.xp.sig} epoch {self.epoch} {name} (T={cfg.temperature})')
        if self.tensorboard is not None:  # logging.log_tensorboard: the same piano roll
            from matplotlib.image import imread
            self.tensorboard.add_image(f'generate/{name}', imread(folder / f'{name}.png'), self.epoch,
                                       dataformats='HWC')
        if not cfg.get('wav', True):
            return set()
        renderer = audio.write_preview(events, folder / f'{name}.wav', qpm=qpm, seconds=cfg.get('preview_seconds'))
        if self.tensorboard is not None:
            wav, rate = audio.read_wav(folder / f'{name}.wav')
            self.tensorboard.add_audio(f'generate/{name}', torch.from_numpy(wav)[None], self.epoch, sample_rate=rate)
        return {renderer}
