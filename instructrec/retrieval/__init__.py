"""Candidate retrievers: popularity, item-to-item (co-occurrence, item-kNN), SASRec, text, and blends.

Every retriever scores the whole catalogue for a batch of histories (`score`), saves to a directory and is
read back by `load_retriever`; see `base.py` for the interface and the vector-search contract.
"""

from instructrec.retrieval.base import Retriever, VectorRetriever, load_retriever
from instructrec.retrieval.blend import Blend
from instructrec.retrieval.cooccurrence import CoOccurrence, ItemKNN
from instructrec.retrieval.popularity import Popularity

__all__ = ["Blend", "CoOccurrence", "ItemKNN", "Popularity", "Retriever", "VectorRetriever", "load_retriever"]
