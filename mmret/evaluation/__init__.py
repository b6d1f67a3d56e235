"""Evaluation: ranking primitives (`ranking`), retrieval and zero-shot metrics (`metrics`), the embedding of a
shard set (`shard_set`, `retrieval`), retrieve-then-rerank (`rerank`), the results document (`results`) and its
pictures (`plots`). Imports only data, models, losses and the ground floor.
"""
