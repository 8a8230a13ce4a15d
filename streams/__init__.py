"""The stream: where events enter. Faust agents consume items, clicks and queries, keep per-user state in
changelog-backed tables and publish recommendations and feedback.

    app.py        the Faust app: topics, tables, agents and views wired together (`create_app`)
    runner.py     one worker process (`python -m streams`, `instructrec worker`)
    agents/       catalog, clicks, queries: plain functions over typed streams
    state/        per-user state: the user context, the served log, table-recovery watchdog
    kafka/        everything that speaks Kafka: topic admin, producer, whole-topic reader, client shims
    services.py   the process-local services the agents call (index, encoders, retriever, reranker client)
    web.py        POST /recommend, GET /users/{id}/context, /health, /metrics
    metrics.py, deadletter.py   the app's Prometheus metrics and its dead-letter path
"""
