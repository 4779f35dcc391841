"""Helpers for tests that compile with torch.compile."""

import torch


def data_dependent(gm) -> list[str]:
    """Nodes of a dynamo graph whose value or shape depends on tensor data. Under torch 2.13,
    fullgraph=True captures `.tolist()`, `.item()` and `nonzero` as unbacked symbols instead of
    breaking the graph, so one graph alone proves little; with dynamic=False every size is
    static, hence any symbol in a node's value is such a capture."""
    def symbolic(v):
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return True
        if isinstance(v, torch.Tensor):
            return any(isinstance(s, torch.SymInt) for s in v.shape)
        return isinstance(v, (tuple, list)) and any(symbolic(e) for e in v)

    return [n.format_node() for n in gm.graph.nodes if symbolic(n.meta.get("example_value"))]
