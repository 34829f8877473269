"""The gRPC server on a mesh (tensor 3 x data 2 over 6 host CPU devices): the same greedy
tokens as Hugging Face transformers, streamed to concurrent clients, pages back after."""

import json
import pathlib
from concurrent.futures import ThreadPoolExecutor

from jaxserve.engine.request import SamplingParams
from jaxserve.loader import load_model
from jaxserve.server.client import Client
from jaxserve.server.grpc_server import InferenceServer, ServerThread
from sharding.mesh import MeshConfig

GOLDEN = json.loads((pathlib.Path(__file__).parent.parent / "fixtures" / "smollm2_golden.json")
                    .read_text())["cases"]
N = 12


def test_server_on_a_tensor_and_data_mesh_matches_transformers(server_config, pages_back):
    config = server_config.replace(mesh=MeshConfig(tensor=3, data=2), cache__max_model_len=256,
                                   cache__kv_cache_memory=float(16 << 20))
    thread = ServerThread(InferenceServer(config, load_model(config, progress=False)))
    try:
        port = thread.start()  # warms up: compiles every bucket on the mesh
        with Client("127.0.0.1", port) as client:
            info = client.model_info(timeout=30)
            assert dict(info.mesh) == {"data": 2, "pipeline": 1, "tensor": 3, "expert": 1}

            def ids(case):  # the reference stops at EOS (included) or after N tokens
                params = SamplingParams(max_tokens=min(N, len(case["greedy_ids"])),
                                        temperature=0.0)
                return [t for c in client.generate(case["prompt_ids"], params, timeout=300)
                        for t in c.token_ids]
            with ThreadPoolExecutor(len(GOLDEN)) as pool:  # all at once: both data shards
                got = list(pool.map(ids, GOLDEN))
            assert got == [case["greedy_ids"][:N] for case in GOLDEN]
            pages_back(client, 0)
    finally:
        thread.stop(grace=0.0)
