"""docs/backends.md's worked examples, run as written: its python blocks, each headed by the file
it belongs in, become a new op (contract + cpu reference) and a new backend with one override."""

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from v4hal import ops
from v4hal.backends import info, registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "backends.md"


def doc_files() -> dict[str, str]:
    blocks = re.findall(r"```python\n# (\S+)\n(.*?)```", DOC.read_text(), re.S)
    return {path: text for path, text in blocks}


@pytest.fixture
def examples(tmp_path, monkeypatch):
    """Both examples installed: the contract as a module, the reference inside the cpu package,
    `mynpu` as a registered backend. Everything is undone afterwards."""
    files = doc_files()
    assert set(files) == {"ops/activation.py", "backends/cpu/activation.py", "mynpu/__init__.py", "mynpu/activation.py"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(registry, "_OPS", dict(registry._OPS))  # register_op's entry goes with it
    cpu = importlib.import_module("v4hal.backends.cpu")
    monkeypatch.setattr(cpu, "__path__", [*cpu.__path__, str(tmp_path / "backends" / "cpu")])
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.spec_from_file_location("doc_activation", tmp_path / "ops" / "activation.py")
    contract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(contract)
    registry.register_backend("mynpu", "mynpu")
    try:
        yield contract
    finally:
        registry.unregister_backend("mynpu")
        for name in ("mynpu", "mynpu.activation", "v4hal.backends.cpu.activation"):
            sys.modules.pop(name, None)


def test_the_new_op_runs_on_every_backend_that_inherits_it(examples):
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 20
    want = 5.0 * torch.tanh(x.double() / 5.0)
    for backend in ("cpu", "cpu_fast", "mindspore"):
        with registry.forced(backend):
            y = examples.softcap(x, 5.0)
        torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)
        assert registry.lookup("softcap", backend) == "cpu"
    with pytest.raises(ops.OpInputError, match="softcap.*'cap'.*positive float"):
        examples.softcap(x, -1.0)


def test_the_new_backend_overrides_one_op_and_inherits_the_rest(examples):
    assert registry.lineage("mynpu") == ("mynpu", "cpu_fast", "cpu")
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)) * 10
    with registry.forced("mynpu"):
        y = examples.softcap(x, 4.0)
        assert registry.choose("softcap").source == "mynpu"
        half = examples.softcap(x.bfloat16(), 4.0)  # not its fast path: the parent's code
        assert registry.choose("rms_norm").source == "cpu_fast"
        norm = ops.rms_norm(x, None, 1e-6)
    torch.testing.assert_close(y.double(), 4.0 * torch.tanh(x.double() / 4.0), rtol=1e-6, atol=1e-6)
    with registry.forced("cpu"):
        assert torch.equal(half, examples.softcap(x.bfloat16(), 4.0))
        torch.testing.assert_close(norm, ops.rms_norm(x, None, 1e-6))


def test_info_shows_the_new_backend_and_what_it_inherits(examples):
    registry.configure(backend="mynpu")
    text = info.format_text(info.report())
    assert "lineage: mynpu -> cpu_fast -> cpu" in text
    softcap = text[text.index("  softcap "):].splitlines()[0]
    assert softcap.split("->")[1].strip() == "mynpu"
    rms = text[text.index("  rms_norm "):].splitlines()[0]
    assert "mynpu (inherited from cpu_fast)" in rms
