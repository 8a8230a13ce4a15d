"""The adapters at the method's edge: the item index in Qdrant (`qdrant`), the reranker on Triton and its
model repository (`triton`), and the one retry policy they share (`retry`). Production code reaches Qdrant
and Triton through these modules only."""
