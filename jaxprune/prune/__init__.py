"""Pruning as pure functions, no I/O: structure (which axes form a channel group), flops
(MACs and params of any widths), criteria (scores), select (masks), shrink (a smaller
model's variables) and agreement (criteria against the oracle)."""
