"""The live demo (`make demo`, `instructrec demo`): the whole system on ml-latest-small, on this machine.

    presets.py     what the full and the quick demo train, replay and fine-tune (`DemoPreset`)
    model.py       the dataset (local copy, or the public archive) and the trained pipeline, cached per preset
    dashboard.py   the live terminal dashboard: what it shows and what feeds it
    run.py         the walk: infrastructure, model, catalogue, workers, live replay, requests, clean stop

The model is trained on the first 70% of time only and the replay sends what came after, so what the stream
answers, the clicks that follow and the fine-tune worker's examples are all news to the served model.
"""

from instructrec.infra.demo.presets import FULL, QUICK, DemoPreset
from instructrec.infra.demo.run import run_demo

__all__ = ["FULL", "QUICK", "DemoPreset", "run_demo"]
