"""The demo's data and model: ml-latest-small from a local copy (or the public archive), and the pipeline
trained on its first `share` of time, cached per preset so that a second demo starts serving at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from instructrec.artifacts import Artifacts
from instructrec.data import Dataset
from instructrec.infra.demo.presets import DemoPreset

DATASET = "ml-latest-small"
CHECKOUT = Path(__file__).resolve().parents[3]


def data_root(given: Path | None, configured: Path, console: Console) -> Path:
    """Where ml-latest-small is: `given`, else the shared copy beside the checkout, else the configured
    data root — fetching the public archive there when no copy exists anywhere."""
    if given is not None:
        if not (given / DATASET).is_dir():
            raise FileNotFoundError(f"{given / DATASET} does not exist")
        return given
    for root in (CHECKOUT.parent / "shared" / "data", configured):
        if (root / DATASET / "ratings.csv").is_file():
            return root
    from workers.fetch import fetch_movielens

    with console.status(f"downloading {DATASET} from GroupLens into {configured}…"):
        fetch_movielens(DATASET, configured)
    return configured


@dataclass(frozen=True)
class Trained:
    artifacts: Artifacts
    early: Dataset  # what the model was trained on
    cut: float  # the time it was trained up to
    cached: bool


def trained_pipeline(dataset: Dataset, preset: DemoPreset, cache: Path, console: Console) -> Trained:
    """The pipeline of `preset`, trained on the interactions up to its time split (or reused from `cache`)."""
    from instructrec import experiment
    from workers.replay import time_split

    early, cut = time_split(dataset, preset.share, preset.users)
    layout = Artifacts.of(cache / preset.model_key(), dataset.name)
    if layout.trained:
        return Trained(layout, early, cut, cached=True)
    config = experiment.PipelineConfig(
        encoder_layers=preset.encoder_layers, decoder_layers=preset.decoder_layers
    )
    config.sasrec.epochs = preset.sasrec_epochs
    config.train.max_minutes = preset.reranker_minutes
    stats = early.describe()
    console.print(
        f"training the {preset.name} pipeline on {stats['interactions']:,} interactions of {stats['users']} users "
        f"(the first {preset.share:.0%} of time; the rest is replayed live), cached in {layout.root}"
    )
    experiment.fit(early, layout, config, verbose=True)
    return Trained(layout, early, cut, cached=False)
