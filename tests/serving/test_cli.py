"""`misleader keys` and `misleader serve`'s argument checks (no server started)."""

from __future__ import annotations

import argparse
import json

import pytest

from misleader.cli import build_parser, main
from misleader.errors import MisleaderError
from misleader.serving.keys import authenticate
from misleader.serving.store import Store


def test_keys_commands(tmp_path, capsys):
    db = str(tmp_path / "k.sqlite3")
    assert main(["keys", "add", "alice", "--budget", "100", "--rate", "10/second", "--db", db]) == 0
    out = capsys.readouterr().out
    created = json.loads(out[:out.rindex("}") + 1])
    key = created["key"]
    assert created["budget"] == 100 and "not shown again" in out
    assert main(["keys", "add", "alice", "--budget", "1", "--db", db]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["keys", "set-budget", "alice", "unlimited", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] is None
    assert main(["keys", "list", "--db", db]) == 0
    listed = capsys.readouterr().out
    assert "alice" in listed and key not in listed
    assert main(["keys", "revoke", "alice", "--db", db]) == 0
    capsys.readouterr()
    s = Store(db)
    assert authenticate(s, key).revoked
    s.close()
    assert main(["keys", "revoke", "bob", "--db", db]) == 2
    assert "no key named 'bob'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "add", "x", "--budget", "-3", "--db", db])


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_serve_refusals(tiny_victim, tmp_path):
    from misleader.commands.serve import build

    db = str(tmp_path / "s.sqlite3")
    for argv, msg in [((str(tmp_path / "nope"),), "not a folder"),
                      ((str(tiny_victim), "--policy", "refuse"), "need --detector"),
                      ((str(tiny_victim), "--detector", str(tmp_path), "--policy", "gate"), "needs --gate-folder"),
                      ((str(tiny_victim), "--detector", str(tmp_path / "nope")), "not a folder"),
                      ((str(tiny_victim), "--detector", str(tmp_path)), "not a SAME detector folder"),
                      ((str(tiny_victim), "--pow-bits", "99"), "pow-bits"),
                      ((str(tiny_victim), "--pow", str(tmp_path)), "PoW config")]:
        with pytest.raises(MisleaderError, match=msg):
            build(_serve_args(*argv, "--db", db))
    (tmp_path / "pow.json").write_text('{"bits": "many"}')
    with pytest.raises(MisleaderError, match="bits"):
        build(_serve_args(str(tiny_victim), "--pow", str(tmp_path), "--db", db))
    (tmp_path / "pow.json").write_text('{"bits": 5, "ttl": 30}')
    app, store, _ = build(_serve_args(str(tiny_victim), "--pow", str(tmp_path), "--db", db))
    assert app.state.gateway.config.pow.bits(key_id="k", x=None) == 5
    store.close()
    with pytest.raises(MisleaderError, match="postgresql"):
        Store("mysql://x")


def test_serve_ray_refusals(tiny_victim, tmp_path):
    """Settings whose Ray Serve replicas could not share their state are refused before Ray starts."""
    from misleader.commands.serve import check_ray

    db = str(tmp_path / "s.sqlite3")
    pg = "postgresql://u@127.0.0.1/db"
    for argv, msg in [(("--replicas", "2", "--db", db), "need --ray"),
                      (("--ray", "--replicas", "2", "--db", db), "share one store"),
                      (("--ray", "--replicas", "2", "--db", pg, "--pow-bits", "4"), "pow-secret-file"),
                      (("--ray", "--db", pg, "--replica-cpus", "0"), "replica-cpus")]:
        with pytest.raises(MisleaderError, match=msg):
            check_ray(_serve_args(str(tiny_victim), *argv))
    check_ray(_serve_args(str(tiny_victim), "--ray", "--db", db))  # one replica may keep its SQLite file
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    check_ray(_serve_args(str(tiny_victim), "--ray", "--replicas", "3", "--db", pg, "--pow-bits", "4",
                          "--pow-secret-file", str(secret)))
