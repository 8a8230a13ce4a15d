"""Smoke tests of the local infrastructure: each service does the one thing the project needs from it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from instructrec.config import KafkaSettings
from instructrec.infra import TritonState

pytestmark = pytest.mark.integration

INSTRUCTREC = Path(sys.executable).parent / "instructrec"


# ------------------------------------------------------------------------------------------------- Kafka


async def test_topics_exist_with_configured_partitions(kafka_settings: KafkaSettings) -> None:
    admin = AIOKafkaAdminClient(**kafka_settings.aiokafka_kwargs())
    await admin.start()
    try:
        described = await admin.describe_topics(kafka_settings.topics.all())
    finally:
        await admin.close()
    partitions = {topic["topic"]: len(topic["partitions"]) for topic in described}
    assert partitions == dict.fromkeys(kafka_settings.topics.all(), kafka_settings.partitions)


async def test_produce_and_consume_through_a_group(kafka_settings: KafkaSettings) -> None:
    topic = kafka_settings.topics.clicks
    run = uuid.uuid4().hex  # this test's events, whatever else is in the topic
    sent = [
        {"event_id": f"{run}-{i}", "user_id": f"u{i % 5}", "item_id": f"i{i}", "kind": "click"}
        for i in range(40)
    ]
    producer = AIOKafkaProducer(
        **kafka_settings.aiokafka_kwargs(),
        key_serializer=str.encode,
        value_serializer=orjson.dumps,
        acks="all",
    )
    await producer.start()
    try:
        for event in sent:
            await producer.send(topic, key=event["user_id"], value=event)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        **kafka_settings.aiokafka_kwargs(),
        group_id=f"smoke-{run}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        value_deserializer=orjson.loads,
    )
    await consumer.start()
    received, partitions_of_user = [], defaultdict(set)
    try:
        async with asyncio.timeout(30):
            while len(received) < len(sent):
                batches = await consumer.getmany(timeout_ms=500)
                for records in batches.values():
                    for record in records:
                        if record.value["event_id"].startswith(run):
                            received.append(record.value)
                            partitions_of_user[record.key.decode()].add(record.partition)
        await consumer.commit()
        committed = {tp: await consumer.committed(tp) for tp in consumer.assignment()}
    finally:
        await consumer.stop()

    assert sorted(received, key=lambda e: e["event_id"]) == sorted(sent, key=lambda e: e["event_id"])
    # Keyed by user: one user's events share a partition, in order (what co-partitioning relies on).
    assert all(len(parts) == 1 for parts in partitions_of_user.values())
    for user in partitions_of_user:
        ids = [e["event_id"] for e in received if e["user_id"] == user]
        assert ids == [e["event_id"] for e in sent if e["user_id"] == user]
    assert any(offset for offset in committed.values())


# ------------------------------------------------------------------------------------------------ Triton


async def test_triton_grpc_aio_answers(triton: TritonState) -> None:
    from tritonclient.grpc import InferInput
    from tritonclient.grpc.aio import InferenceServerClient

    data = np.arange(6, dtype=np.float32)
    async with InferenceServerClient(triton.grpc_url) as client:
        assert await client.is_server_ready()
        assert await client.is_model_ready("health")
        request = InferInput("INPUT0", list(data.shape), "FP32")
        request.set_data_from_numpy(data)
        result = await client.infer("health", [request], client_timeout=10)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_triton_http_answers(triton: TritonState) -> None:
    import tritonclient.http as httpclient

    data = np.linspace(-1, 1, 5, dtype=np.float32)
    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=10)
    try:
        assert client.is_server_ready()
        assert client.is_model_ready("health")
        request = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        request.set_data_from_numpy(data)
        result = client.infer("health", [request])
    finally:
        client.close()
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def test_up_loads_models_into_the_running_server(local_infra, triton: TritonState) -> None:
    """Explicit model control: `up` on a running server loads what it does not serve, without a restart."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(triton.http_url, network_timeout=30)
    try:
        client.unload_model("health")
        assert not client.is_model_ready("health")
        again = local_infra.start_triton(models=["health"])
        assert again.pid == triton.pid
        assert client.is_model_ready("health")
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------ Qdrant


def test_qdrant_local_round_trip(qdrant_path: Path) -> None:
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(qdrant_path))
    try:
        name = f"smoke_{uuid.uuid4().hex[:8]}"
        client.create_collection(
            name, vectors_config=models.VectorParams(size=3, distance=models.Distance.COSINE)
        )
        client.upsert(
            name,
            points=[
                models.PointStruct(id=1, vector=[1.0, 0.0, 0.0], payload={"title": "Alien (1979)"}),
                models.PointStruct(id=2, vector=[0.0, 1.0, 0.0], payload={"title": "Toy Story (1995)"}),
                models.PointStruct(id=3, vector=[0.7, 0.7, 0.0], payload={"title": "Aliens (1986)"}),
            ],
        )
        hits = client.query_points(name, query=[0.9, 0.1, 0.0], limit=2, with_payload=True).points
        client.delete_collection(name)
    finally:
        client.close()  # local mode holds a file lock while open
    assert [hit.id for hit in hits] == [1, 3]
    assert hits[0].payload == {"title": "Alien (1979)"}


# --------------------------------------------------------------------------------------------------- CLI


def _status(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTRUCTREC), "infra", "status"],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _states(table: str) -> dict[str, str]:
    """service -> state, from the rows of the rich status table."""
    rows = (line.split("│") for line in table.splitlines() if line.startswith("│"))
    return {cells[1].strip(): cells[2].strip() for cells in rows if cells[1].strip()}


def test_cli_status_reports_healthy(infra) -> None:
    result = _status(infra.env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert _states(result.stdout) == {"kafka": "up", "triton": "up", "qdrant": "up"}


def test_cli_status_is_honest_about_a_held_qdrant_storage(infra) -> None:
    """While this process holds the local storage, status names us instead of pretending it queried it."""
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(infra.state.qdrant.path))
    try:
        result = _status(infra.env())
    finally:
        client.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert _states(result.stdout)["qdrant"] == "in use"
    assert f"opened by pid {os.getpid()}" in result.stdout


def test_cli_status_fails_when_nothing_runs(tmp_path: Path) -> None:
    from instructrec.infra import free_ports

    kafka_port, triton_port = free_ports(2)
    env = {
        **os.environ,
        "INSTRUCTREC_STATE_DIR": str(tmp_path / "state"),
        "INSTRUCTREC_KAFKA__BROKER": f"kafka://127.0.0.1:{kafka_port}",
        "INSTRUCTREC_TRITON__URL": f"127.0.0.1:{triton_port}",
        "INSTRUCTREC_QDRANT__PATH": str(tmp_path / "qdrant"),
    }
    result = _status(env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert _states(result.stdout) == {"kafka": "down", "triton": "down", "qdrant": "not started"}
