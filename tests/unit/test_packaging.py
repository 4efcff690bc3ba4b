"""Each side imports only what its extra installs.

The trainer never imports the server (its extra has no scipy or
prometheus-client server side), the client never imports torch,
transformers or the server, and the demo lives outside the product.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import gradmix.client
import gradmix.trainer


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import sys\n"
        f"for name in {modules!r}: __import__(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def _submodules(package: object) -> list[str]:
    return [
        info.name
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + ".")  # type: ignore[attr-defined]
        if not info.name.endswith("__main__")
    ]


def test_trainer_never_imports_the_server_or_the_demo() -> None:
    loaded = _loaded_after_import(_submodules(gradmix.trainer))
    assert not {m for m in loaded if m.startswith(("gradmix.server", "gradmix.demo"))}


def test_client_imports_neither_torch_nor_the_server() -> None:
    """All of the client but its torch adapter (`torch_data`, there for torch loaders)."""
    modules = [m for m in _submodules(gradmix.client) if m != "gradmix.client.torch_data"]
    loaded = _loaded_after_import(["gradmix.client", *modules])
    heavy = {"torch", "transformers", "deepspeed", "scipy"}
    assert not {m for m in loaded if m.split(".")[0] in heavy or m.startswith("gradmix.server")}
