"""Serving the reranker: the wire format of a request (`wire`, light: the client side imports it), the
server-side scorer that answers a batch in one forward pass (`scorer`, torch), and the serving options a
model version runs with (`options`)."""
