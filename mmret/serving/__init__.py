"""Use what you trained: a search index of a shard set (LanceDB), search with the dual encoder and rerank with
the cross-encoder (`Retriever`), an HTTP service with one page (`create_app`), and the hand-off of the best
images to a vision-capable LLM (`rag_messages`).

    from mmret.serving import Retriever, rag_messages
    retriever = Retriever.open("runs/shapes.index", reranker="runs/shapes_reranker/checkpoints/last.ckpt")
    results = retriever.search(texts=["a red circle left of a blue square"], k=5, rerank_top=20)[0]
    messages = rag_messages("Which image shows ...?", results, retriever.image_bytes)

Nothing here is imported by the layers below it (training, evaluation, data); `mmret.cli` commands call it.
"""

from mmret.serving.index import SearchIndex, build_index
from mmret.serving.rag import rag_messages
from mmret.serving.retriever import Retriever, SearchResult

__all__ = ["Retriever", "SearchIndex", "SearchResult", "build_index", "rag_messages"]
