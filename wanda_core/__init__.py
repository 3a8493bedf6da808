"""wanda_core: post-training pruning of Hugging Face causal LMs (magnitude, Wanda, SparseGPT, RIA, OWL, DSnoT,
ALPS, ADMM, SparseSwaps, three-tier block patterns)."""
__version__ = "0.1.0"

from .data import calibration_windows, load_windows, read_corpus, read_records, save_windows, tokenize
from .errors import WandaError
from .evaluate import interval, perplexity, window_nll
from .hardware import set_threads
from .masks import Pattern, nm_mask, parse_pattern, unstructured_matrix_mask, unstructured_row_mask
from .methods import METHODS, get_method
from .model import all_targets, check_sparsity, find_blocks, find_targets, load_model, load_tokenizer
from .engine import prune
from .pruned import apply_masks, load_pruned, save_pruned

__all__ = [
    "WandaError", "load_model", "load_tokenizer", "read_corpus", "read_records", "tokenize", "calibration_windows",
    "save_windows", "load_windows", "prune", "perplexity", "check_sparsity", "find_blocks", "find_targets",
    "all_targets", "METHODS", "get_method", "Pattern", "parse_pattern", "nm_mask", "unstructured_row_mask",
    "unstructured_matrix_mask", "save_pruned", "load_pruned", "apply_masks", "window_nll", "interval", "set_threads",
]
