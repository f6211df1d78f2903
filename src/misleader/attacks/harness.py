"""Run an attack against a victim or defense folder and write an attack folder.

:func:`run_attack` is the one entry point (the ``attack`` CLI and the experiment runner call it):

1. open the target (:func:`misleader.oracle.load.describe_target`) and its dataset and split;
2. compute the target's answers on the test set *once*, through an unbudgeted oracle that the
   attacker never sees (harness-side evaluation, not counted against the budget);
3. build the attacker's oracle (``open_accounted(target, output=..., budget=budget)``), the clone
   (``create_model(clone_arch, ...)`` with mean/std 0.5: the attacker's own guess, it does not know the
   victim's normalisation) and, for attacks with ``needs_pool``, the pool
   (:func:`misleader.attacks.pools.load_pool`, handed over with ``attack.prepare(pool_x=, pool_y=)``);
4. run the attack on a *sealed* view of the oracle (:class:`~misleader.oracle.base.SealedOracle`:
   nothing settable, no reset) with an ``evaluate(clone)`` callback (test accuracy and fidelity, for
   the history only), and check the accounting on the accountant that only the harness holds
   (:func:`~misleader.oracle.load.open_accounted`): ``used <= budget`` and ``== result.queries_used``;
5. write ``clone.safetensors`` + ``clone.json``, ``history.json`` and, last and atomically,
   ``result.json``. ``out`` is claimed first (:func:`misleader.fingerprint.claim_out_dir`, before any
   work): a folder with a ``result.json`` and the same settings fingerprint is finished and calling
   again returns it; other settings are a one-line error unless ``force``.

The pool choice (:meth:`~misleader.attacks.base.Attack.choose_pool`) and ``attack.adapt_to_target``
see only the public metadata ``{dataset, input_shape, num_classes}``, never the defense's manifest.

``result.json`` keys: ``clone_accuracy`` (the final clone), ``clone_accuracy_best`` (the best over the
history's evaluations: test-set selection, for comparison with papers only), ``fidelity`` (top-1
agreement of the final clone with the target on the test set), ``queries_used``, ``budget``,
``target_test_accuracy`` (the target as the attacker sees it, e.g. the defended ensemble),
``victim_test_accuracy`` (defense targets, when their manifest/result records it), ``seconds`` (the
attack's wall time *without* the harness's evaluations), ``eval_seconds``, ``cpu_seconds`` (the
process's CPU time in the attack, without evaluations: on a shared machine it is closer to the wall
time the attack would take alone), ``threads``, ``attack``, ``labels``,
``pool``, ``clone_arch``, ``target_kind``, ``options`` (the attack's full configuration), ``extra``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from misleader.attacks.base import ATTACKS, Attack
from misleader.errors import MisleaderError
from misleader.metrics import accuracy, fidelity
from misleader.utils import environment, forked_rng, progress, read_json, resolve_device, seed_everything, write_json

log = logging.getLogger(__name__)

#: ``labels`` argument -> oracle output mode
LABEL_MODES = {"soft": "probs", "hard": "labels"}


def make_attack(name: str, options: dict[str, Any] | None = None) -> Attack:
    """Instantiate a registered attack with constructor options; unknown options are a clear error."""
    import misleader.attacks  # noqa: F401  (registers every attack module present)

    cls = ATTACKS.get(name)
    try:
        return cls(**(options or {}))
    except TypeError as exc:
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise MisleaderError(f"bad options for attack {name!r} ({exc}); it accepts: {', '.join(params)}") from None


def run_attack(
    name: str,
    *,
    target: str | Path,
    budget: int,
    clone_arch: str,
    out: str | Path,
    data_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    labels: str | None = None,
    pool: str | None = None,
    options: dict | None = None,
    eval_every: int | None = None,
    force: bool = False,
    api_key: str | None = None,
    referee_key: str | None = None,
    pow: str | Path | None = None,
) -> dict:
    """Attack ``target`` with ``name`` and write the attack folder ``out``.

    Args:
        name: registered attack (``knockoff``, ``dfme``, ``dfms-hl``).
        target: victim folder (``model.json``) or defense folder (``manifest.json``).
        budget: the most queries the attacker may make.
        clone_arch: architecture of the clone (a registered model name).
        out: output folder; if it already holds ``result.json`` written with the same settings, that
            result is returned (no rerun); other settings: an error unless ``force``.
        data_dir: dataset root (default ``$MISLEADER_DATA`` or ``./data``).
        seed: seeds everything (clone init, pool sampling, training order).
        device: ``auto``, ``cpu`` or ``cuda``.
        labels: ``soft`` (the oracle answers probabilities) or ``hard`` (top-1 labels only); ``None``: soft
            where the attack can use probabilities, else hard.
        pool: attacker data for pool-based attacks (:func:`misleader.attacks.pools.load_pool` spec);
            default: the attack's :meth:`~misleader.attacks.base.Attack.choose_pool`.
        options: the attack's constructor keyword arguments (e.g. ``{"strategy": "adaptive"}``).
        eval_every: evaluate the clone every this many queries (attacks that train while querying).
        force: start over when ``out`` holds a run with other settings.
        api_key: with ``target`` a gateway URL (``http://HOST:PORT``): the attacker's key.
        referee_key: with a URL target: a second key (outside the attacker's budget) through which the
            harness measures the target's test-set answers.
        pow: a proof-of-work calibration folder (``misleader pow calibrate``): every answered batch is
            metered, and ``result.json`` gains a ``pow`` block (cumulative cost, the puzzle seconds an
            attacker of this machine's hash rate would have spent, raw query seconds, overhead ratio).

    Returns:
        The ``result.json`` dict.

    Raises:
        MisleaderError: unknown attack/architecture/options, labels mode the attack cannot use, missing data.
    """
    from misleader.attacks.pools import load_pool
    from misleader.fingerprint import check_out_dir, claim_out_dir
    from misleader.models import MODELS, create_model
    from misleader.oracle.load import load_oracle, open_accounted
    from misleader.oracle.manifest import read_target
    from misleader.training.checkpoint import save_model
    from misleader.training.evaluate import predict_probs, query_all
    from misleader.training.victim import load_target_data

    if labels is not None and labels not in LABEL_MODES:
        raise MisleaderError(f"labels must be soft or hard, got {labels!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise MisleaderError(f"budget must be an integer >= 1, got {budget!r}")
    out = check_out_dir(out)
    attack = make_attack(name, options)
    if labels is None:  # the attack's own mode: soft where it can use probabilities
        labels = "soft" if LABEL_MODES["soft"] in attack.requires else "hard"
    output = LABEL_MODES[labels]
    if output not in attack.requires:
        ok = " or ".join(k for k, v in LABEL_MODES.items() if v in attack.requires)
        raise MisleaderError(f"attack {name!r} cannot work with {labels} labels: use --labels {ok}")
    MODELS.get(clone_arch)  # fail fast on an unknown architecture
    from misleader.serving.client import is_url

    remote = is_url(target)
    if remote:
        from misleader.serving.client import connect, open_remote

        if not api_key or not referee_key:
            raise MisleaderError("a server target needs --api-key (the attacker's key) and --referee-key (a second "
                                 "key the harness measures the target's test answers with)")
        referee_oracle = connect(str(target), api_key=referee_key, output="probs")
        meta = {**referee_oracle.info, "kind": referee_oracle.info.get("kind", "victim")}
        public_meta = {k: meta[k] for k in ("dataset", "input_shape", "num_classes")}
        target_id, target_digest = str(target), str(meta["fingerprint"])
    else:
        target = Path(target)
        parsed = read_target(target)
        meta = parsed.meta
        public_meta = parsed.public_meta()  # all the pool choice and adapt_to_target may see
        target_id, target_digest = str(parsed.folder), _target_digest(parsed.folder)
    if not isinstance(meta.get("dataset"), str):
        raise MisleaderError(f"{target}: the folder's metadata names no dataset; re-create it with train-victim/defend")
    settings = {"attack": name, "target": target_id, "target_sha256": target_digest,
                "budget": int(budget), "clone_arch": clone_arch, "labels": labels, "pool": pool,
                "options": options or {}, "seed": int(seed), "eval_every": eval_every,
                **({"pow": str(Path(pow).resolve())} if pow is not None else {})}
    if out.is_dir() and any(out.iterdir()):  # an earlier run (or a foreign folder): decide before any work
        if claim_out_dir(out, settings, force=force, command="misleader attack") and (out / "result.json").exists():
            log.info("%s already holds this finished attack; pass --force to run again", out)
            return read_json(out / "result.json")
    dev = resolve_device(device)
    gen = seed_everything(seed)
    t_start = time.perf_counter()
    data, splits = load_target_data(meta, data_dir=data_dir)
    shape = [int(s) for s in meta["input_shape"]]
    k = int(meta["num_classes"])

    # the target's test-set answers, once, outside the attacker's budget
    referee = referee_oracle if remote else load_oracle(target, output="probs", budget=None, device=dev)
    target_pred = query_all(referee, data.x_test).argmax(1)
    del referee
    target_acc = accuracy(target_pred, data.y_test)
    eval_seconds = eval_cpu = 0.0
    x_test = data.x_test.to(dev)  # uint8, moved once (evaluations run on the device)

    eval_rows: list[dict[str, Any]] = []

    def measure(clone: torch.nn.Module) -> dict[str, float]:
        nonlocal eval_seconds, eval_cpu
        t0, c0 = time.perf_counter(), time.process_time()
        pred = predict_probs(clone, x_test, device=dev, amp=False).argmax(1)  # float32, as the referee
        res = {"clone_accuracy": accuracy(pred, data.y_test), "fidelity": fidelity(pred, target_pred)}
        eval_seconds += time.perf_counter() - t0
        eval_cpu += time.process_time() - c0
        return res

    def evaluate(clone: torch.nn.Module, *, queries: int, **fields: Any) -> None:
        """The attack's log-only callback: the measurement goes to the harness's history, not back."""
        row = {"queries": int(queries), **fields, **measure(clone)}
        eval_rows.append(row)
        log.info("%s %d/%d queries: %s", name, row["queries"], budget, row)

    pool_spec = None
    if attack.needs_pool:
        pool_spec = pool or attack.choose_pool(dict(public_meta))
        pool_x, pool_y = load_pool(pool_spec, target_meta=meta, data_dir=data_dir, target_data=(data, splits))
        attack.prepare(pool_x=pool_x, pool_y=pool_y)
    elif pool is not None:
        log.warning("attack %s uses no pool; ignoring pool=%r", name, pool)

    claim_out_dir(out, settings, force=force, command="misleader attack")  # user errors above leave no folder
    with forked_rng(gen, torch.device("cpu")):
        clone = create_model(clone_arch, in_channels=shape[0], num_classes=k, mean=[0.5] * shape[0],
                             std=[0.5] * shape[0])
    attack.adapt_to_target(dict(public_meta))
    if remote:
        oracle, accountant = open_remote(str(target), api_key=api_key, output=output, budget=budget)
    else:
        oracle, accountant = open_accounted(target, output=output, budget=budget, device=dev)
    bar = progress(total=budget, desc=f"{name} queries", unit="q")
    accountant.on_query = bar.update
    meter, raw_seconds = None, [0.0]
    if pow is not None:
        if remote:
            raise MisleaderError("--pow meters an in-process target; a server applies its own proof-of-work "
                                 "(misleader serve --pow)")
        from misleader.pow.metering import PowMeter

        meter = PowMeter.from_folder(pow, device=dev)

        def on_answer(x: torch.Tensor, probs: torch.Tensor, seconds: float) -> None:
            meter.observe(x, probs)
            raw_seconds[0] += seconds

        accountant.on_answer = on_answer
    log.info("attack %s on %s (%s, %s labels), budget %d, clone %s", name, target, meta["kind"], labels, budget,
             clone_arch)
    cpu0 = time.process_time()
    result = attack.run(oracle.sealed(), budget=budget, clone=clone, generator=gen, device=dev, evaluate=evaluate,
                        eval_every=eval_every)
    cpu_seconds = time.process_time() - cpu0 - eval_cpu
    bar.close()
    if accountant.used > budget or accountant.used != result.queries_used:
        raise RuntimeError(f"attack {name!r} broke the query accounting: oracle counted {accountant.used}, "
                           f"the attack reported {result.queries_used}, budget {budget}")
    attack_seconds = result.seconds - eval_seconds

    final = measure(result.clone)
    history = merge_history(result.history, eval_rows)
    last = history[-1] if history else None
    if last is None or (last.get("clone_accuracy"), last.get("fidelity")) != (final["clone_accuracy"], final["fidelity"]):
        history.append({"queries": int(result.queries_used), **final, "final": True})
    best = max(float(r["clone_accuracy"]) for r in history if "clone_accuracy" in r)

    out.mkdir(parents=True, exist_ok=True)
    save_model(result.clone, out, name="clone", meta={
        "dataset": meta["dataset"], "num_classes": k, "input_shape": shape, "class_names": meta.get("class_names"),
        "seed": seed, "split": meta.get("split"), "attack": name, "target": str(target),
        "metrics": {"clone_accuracy": final["clone_accuracy"], "fidelity": final["fidelity"]},
    })
    write_json(out / "history.json", history)
    res: dict[str, Any] = {
        "clone_accuracy": final["clone_accuracy"],
        "clone_accuracy_best": best,
        "fidelity": final["fidelity"],
        "queries_used": int(result.queries_used),
        "budget": int(budget),
        "target_test_accuracy": target_acc,
        "seconds": attack_seconds,
        "eval_seconds": eval_seconds,
        "cpu_seconds": cpu_seconds,
        "threads": torch.get_num_threads(),
        "wall_seconds": time.perf_counter() - t_start,
        "attack": name,
        "labels": labels,
        "pool": pool_spec,
        "clone_arch": clone_arch,
        "target": str(target),
        "target_kind": meta["kind"],
        "dataset": meta["dataset"],
        "seed": seed,
        "device": str(dev),
        "options": attack.config(),
        "extra": result.extra,
        "notes": "clone_accuracy: final clone; clone_accuracy_best: best over evaluations (test-set selection, "
                 "for comparison with papers only); seconds exclude the harness's evaluations",
    }
    if meta["kind"] == "defense":
        res["defense"] = meta.get("defense")
        vacc = meta.get("victim_test_accuracy")
        if vacc is None and not remote and (target / "result.json").exists():
            vacc = read_json(target / "result.json").get("victim_test_accuracy")
        if vacc is not None:
            res["victim_test_accuracy"] = float(vacc)
    if remote:  # what the attacker paid the server in proof-of-work (0 without --pow)
        res["pow_seconds"], res["pow_bits"] = oracle.pow_seconds, oracle.pow_bits
    if meter is not None:
        if meter.queries != accountant.used:
            raise RuntimeError(f"the proof-of-work meter saw {meter.queries} rows, the oracle answered {accountant.used}")
        res["pow"] = meter.summary(raw_seconds[0])
    res["environment"] = environment()
    write_json(out / "result.json", res)
    log.info("%s: clone accuracy %.4f (best %.4f), fidelity %.4f, %d queries, %.1fs", name,
             res["clone_accuracy"], best, res["fidelity"], res["queries_used"], attack_seconds)
    return res


def _target_digest(folder: Path) -> str:
    """sha256 of a target's manifest or sidecar: a re-created target is another target."""
    import hashlib

    from misleader.oracle.manifest import check_regular_file

    f = folder / "manifest.json" if (folder / "manifest.json").exists() else folder / "model.json"
    return hashlib.sha256(check_regular_file(f).read_bytes()).hexdigest()


def merge_history(attack_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The attack's own rows and the harness's evaluation rows, in query order (stable; an evaluation row
    follows the attack's rows at the same query count).

    Example:
        >>> merge_history([{"queries": 5, "loss": 1.0}], [{"queries": 5, "clone_accuracy": 0.5}, {"queries": 1}])
        [{'queries': 1}, {'queries': 5, 'loss': 1.0}, {'queries': 5, 'clone_accuracy': 0.5}]
    """
    tagged = [(int(r.get("queries", 0)), 0, i, r) for i, r in enumerate(attack_rows)]
    tagged += [(int(r.get("queries", 0)), 1, i, r) for i, r in enumerate(eval_rows)]
    return [r for *_, r in sorted(tagged, key=lambda t: t[:3])]


__all__ = ["run_attack", "make_attack", "merge_history", "LABEL_MODES"]
