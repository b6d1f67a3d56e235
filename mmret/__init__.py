"""mmret: training and finetuning multimodal retrieval models (dual encoders and cross-encoder rerankers).

Start with `mmret --help`, `make demo` or the README.
"""

__version__ = "0.1.0"
