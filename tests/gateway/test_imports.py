"""The gateway's container has no torch: nothing on its import path may pull it in."""

import subprocess
import sys


def test_gateway_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import gateway.server, gateway.servicer, gateway.policies, gateway.pool\n"
        "import specmesh.cli.serve_gateway\n"
        "from specmesh.cli import serve_gateway\n"
        "serve_gateway.build_parser()\n"
        "leaked = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not leaked, f'torch imported: {leaked[:5]}'\n"
        "# no model directory either: the tokenizer comes from the target (GetTokenizer)\n"
        "assert 'services.core.model_store' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_specmesh_cli_reaches_serve_gateway_without_torch() -> None:
    """`specmesh serve gateway` loads every subcommand's parser first: none of them may need torch."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # `import torch` now raises ImportError\n"
        "from specmesh.cli.main import main\n"
        "sys.argv = ['specmesh', 'serve', 'gateway', '--help']\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--target" in out.stdout
