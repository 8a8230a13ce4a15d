"""Settings that reach the Faust app's own clients: `StreamSettings.instance_id` becomes the group instance id
(static membership) of the consumer a worker runs. Why a restarted worker needs it on the local broker:
tests/integration/test_crash.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pydantic
import pytest

from instructrec.config import Settings
from streams.app import create_app
from streams.services import Services


@contextlib.asynccontextmanager
async def worker_consumer(settings: Settings) -> AsyncIterator:
    """The aiokafka consumer that the worker's consumer thread would start (built, never started)."""
    stream = create_app(settings, Services(index=None, encoder=None, reranker=None))
    consumer = stream.app.consumer._thread._create_consumer(loop=asyncio.get_running_loop())
    try:
        yield consumer
    finally:
        await consumer.stop()


async def test_an_instance_id_makes_the_worker_a_static_group_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INSTRUCTREC_STREAM__INSTANCE_ID", "instructrec-worker-0")
    settings = Settings(_env_file=None, state_dir=tmp_path, stream={"store": "memory"})
    assert settings.stream.instance_id == "instructrec-worker-0"
    async with worker_consumer(settings) as consumer:
        assert consumer._group_instance_id == "instructrec-worker-0"
        assert consumer._group_id == settings.stream.app_id


async def test_without_one_the_worker_is_a_dynamic_member(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, state_dir=tmp_path, stream={"store": "memory"})
    async with worker_consumer(settings) as consumer:
        assert consumer._group_instance_id is None


def test_an_empty_instance_id_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="instance_id"):
        Settings(_env_file=None, stream={"instance_id": ""})


async def test_table_partitions_open_rocksdb_with_bounded_memory(tmp_path: Path) -> None:
    """Faust's defaults (3 × 64 MB memtables and a 2 GB block cache per table partition) let a worker's
    memory grow with every byte written (benchmarks/soak.py), and every table file stays open; the settings
    bound each partition's DB."""
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path,
        stream={
            "table_write_buffer_mb": 2,
            "table_write_buffers": 3,
            "table_block_cache_mb": 8,
            "table_max_open_files": 24,
        },
    )
    stream = create_app(settings, Services(index=None, encoder=None, reranker=None))
    for table in (stream.tables.context, stream.tables.served):
        options = table.data.rocksdb_options
        assert (options.write_buffer_size, options.max_write_buffer_number) == (2 * 2**20, 3)
        assert options.block_cache_size == 8 * 2**20
        assert options.max_open_files == 24  # descriptors bounded, not only by compaction
        db = options.open(tmp_path / table.name)  # a real RocksDB opens with them
        db[b"k"] = b"v"
        assert db[b"k"] == b"v"
        db.close()


def test_the_producer_batches_what_a_served_log_record_needs(tmp_path: Path) -> None:
    """aiokafka's 16 KiB batch held one served-log record alone: the next write to its partition waited a
    broker round trip inside Faust's single sender, with every answer queued behind it."""
    settings = Settings(_env_file=None, state_dir=tmp_path, stream={"producer_batch_kb": 64})
    stream = create_app(settings, Services(index=None, encoder=None, reranker=None))
    assert stream.app.conf.producer_max_batch_size == 64 * 1024
