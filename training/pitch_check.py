"""How far the in-graph pitch tracker (training/pitch.py) is from librosa's pYIN on real speech.

    python -m training.pitch_check --data ../shared/data [--corpus ravdess] [--per-speaker 3] [--seed 0]

Draws ``--per-speaker`` clips of every speaker of the corpus, tracks them with both on the same frames
(40 ms every 20 ms; pYIN with its default Viterbi voicing) and prints, per gender: the share of frames
both call voiced where the two F0s differ by more than 3 semitones (gross errors, mostly octave jumps of
one or the other), the share of pYIN's voiced frames the tracker also calls voiced, and the share of the
tracker's voiced frames pYIN calls unvoiced. pYIN is not the truth (it has its own octave errors); it is
a standard, independent reference. Nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from .datasets import DatasetError, load_audio, scan_corpora, utterances_by_speaker
from .pitch import REFERENCE_HZ, PitchConfig, PitchTracker

GROSS_SEMITONES = 3.0


def compare(audio: np.ndarray, tracker: PitchTracker) -> np.ndarray:
    """[both voiced, gross errors among them, pYIN voiced, tracker voiced, tracker voiced where pYIN is not]."""
    import librosa

    config, rate = tracker.config, tracker.config.sample_rate
    track = tracker(torch.from_numpy(audio[None].astype(np.float32)), torch.tensor([audio.size]))
    # The tracker's frame t covers samples [2 hop t, 2 hop t + 2 window) at the full rate: the same frames for pYIN.
    f0, voiced_ref, _ = librosa.pyin(audio, fmin=config.f_min, fmax=config.f_max, sr=rate,
                                     frame_length=2 * tracker.window, hop_length=2 * tracker.hop, center=False)
    n = min(track.voiced.shape[1], f0.size)
    mine = track.voiced[0, :n].numpy() > 0
    ref = voiced_ref[:n]
    both = mine & ref
    ref_semitones = 12.0 * np.log2(np.where(ref, f0[:n], REFERENCE_HZ) / REFERENCE_HZ)
    gross = np.abs(track.semitones[0, :n].numpy() - ref_semitones) > GROSS_SEMITONES
    return np.array([both.sum(), (gross & both).sum(), ref.sum(), mine.sum(), (mine & ~ref).sum()], dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the folder holding the corpora")
    parser.add_argument("--corpus", default="ravdess")
    parser.add_argument("--per-speaker", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        scan = scan_corpora(args.data, [args.corpus])
    except DatasetError as exc:
        print(f"pitch_check: error: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    tracker = PitchTracker(PitchConfig())
    totals: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(5, dtype=np.int64))
    clips, unreadable = 0, []
    for _, utterances in sorted(utterances_by_speaker(scan.utterances).items()):
        for i in rng.choice(len(utterances), size=min(args.per_speaker, len(utterances)), replace=False):
            u = utterances[int(i)]
            try:
                audio = load_audio(u.path)
            except DatasetError as exc:  # one bad file is counted and named, not the end of the check
                unreadable.append(str(exc))
                continue
            totals[u.gender or "unknown"] += compare(audio, tracker)
            clips += 1
    if unreadable:
        print(f"pitch_check: skipped {len(unreadable)} unreadable clip(s), first: {unreadable[0]}", file=sys.stderr)
    print(f"{clips} clips of {args.corpus}, {args.per_speaker} a speaker (seed {args.seed}), against librosa's pYIN")
    print("| gender | frames both voiced | gross errors (> 3 semitones) | pYIN's voiced found | voiced where pYIN is not |")
    print("|---|---|---|---|---|")
    for gender, (both, gross, ref, mine, extra) in sorted(totals.items()):
        print(f"| {gender} | {both} | {100 * gross / max(both, 1):.1f} % | {100 * both / max(ref, 1):.1f} % | "
              f"{100 * extra / max(mine, 1):.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
