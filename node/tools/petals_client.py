"""The Petals side of `python -m node.bench_petals`: a real Petals client drives a swarm and times it.

Run under the interpreter that has `petals` installed (--petals_python), not the node's:
    PETALS_PYTHON node/tools/petals_client.py MODEL_PATH TOKENS SESSIONS DTYPE PEER_MADDR...
Prints one line `RESULT {json}`: generation and forward/backward figures through the swarm, the same work
in plain transformers on this machine, and whether the tokens matched.
"""

import gc
import json
import statistics
import sys
import threading
import time

import torch
from petals import AutoDistributedModelForCausalLM
from transformers import AutoModelForCausalLM

# Petals 2.2.0's client deadlocks when the cyclic garbage collector happens to run in its event loop's
# thread and finalizes an inference session there (its __del__ waits on that same loop; seen here, about
# one run in four on a loaded machine): collect only here, in the main thread, between measurements.
gc.disable()

model_path, tokens, sessions, dtype, peers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
dtype = getattr(torch, dtype)
torch.manual_seed(0)
model = AutoDistributedModelForCausalLM.from_pretrained(
    model_path, initial_peers=peers, dht_prefix="bench", torch_dtype=dtype
)
ref = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype)
vocab, hidden = ref.config.vocab_size, ref.config.hidden_size
prompt = torch.tensor([[1, 15, 27, 99, 4, 63, 250, 7]])
prompts = torch.randint(3, vocab, (sessions, 8))
out = {}


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
        gc.collect()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        gc.collect()
    return statistics.median(times)


def generate(m, ids):
    return m.generate(ids, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)


expected = generate(ref, prompt)
served = generate(model, prompt)
out["tokens_match"] = served.tolist() == expected.tolist()
out["generation"] = tokens / timed(lambda: generate(model, prompt), 3)


def together():
    results = [None] * sessions

    def one(i):
        results[i] = generate(model, prompts[i : i + 1])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


out["concurrent"] = sessions * tokens / timed(together, 2)
x = torch.randn(4, 128, hidden).to(dtype)


def layer_figures(layers):  # forward tokens/s, and forward+backward ms per call, of x through layers
    with torch.no_grad():
        forward = 4 * 128 / timed(lambda: layers(x), 5)

    def backward():
        leaf = x.clone().requires_grad_(True)
        layers(leaf).backward(torch.ones(4, 128, hidden, dtype=dtype))

    return forward, 1000 * timed(backward, 3)


out["forward"], out["backward_ms"] = layer_figures(model.model.layers)
out["local_generation"] = tokens / timed(lambda: generate(ref, prompt), 3)
out["local_concurrent"] = sessions * tokens / timed(lambda: generate(ref, prompts), 2)
position_ids = torch.arange(128)[None]


def local_layers(h):
    # transformers >= 4.43 computes the rotary embeddings once per model; older ones (Petals 2.2.0's 4.34)
    # in each layer from the positions
    rotary = getattr(ref.model, "rotary_emb", None)
    extra = {"position_embeddings": rotary(h, position_ids)} if rotary is not None else {}
    mask = torch.full((128, 128), float("-inf"), dtype=dtype).triu(1)[None, None].expand(h.shape[0], 1, 128, 128)
    for layer in ref.model.layers:
        h = layer(h, attention_mask=mask, position_ids=position_ids, **extra)
        h = h[0] if isinstance(h, tuple) else h
    return h


out["local_forward"], out["local_backward_ms"] = layer_figures(local_layers)
print("RESULT " + json.dumps(out), flush=True)
