"""lmlab: which architecture and which tokenizer model this text best, for this budget?"""

__version__ = "0.1.0"
