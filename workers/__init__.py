"""Batch and long-running jobs beside the stream, each with its command (`workers.commands`):

index.py      a dataset's catalogue → item events
replay.py     a dataset's interactions → click and query events, in time order
fetch.py      a public MovieLens release, downloaded on request
commands.py   fetch, train, evaluate, export, index, replay, produce, subscribe
"""
