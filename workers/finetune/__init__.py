"""The fine-tune worker: it learns from the stream's feedback and clicks, gates what it learned on the newest
examples, and hot-swaps an accepted model into Triton (`worker`; `instructrec finetune`).

    store.py     the durable example store (examples and consumer positions in one transaction)
    ingest.py    events → examples
    cycle.py     one cycle: split, prepare, train (LoRA merged, or full), judge
    gate.py      the paired decision on held-out examples
    publish.py   the swap into Triton, rollback, reconciliation after a crash
    worker.py    the long-running loop
"""
