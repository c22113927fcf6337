"""Restricting vLLM's CommonAttentionMetadata to some requests (the stock sub-batch).

Uses vLLM's own dataclass. A field the plugin does not know how to restrict
makes the split refuse (None), and the builder then runs that batch stock.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("vllm")


def metadata(**extra):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    q_lens = torch.tensor([1, 5, 1, 7], dtype=torch.int32)
    qsl = torch.zeros(5, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    seq = torch.tensor([40, 300, 12, 700], dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=seq.clone(), num_reqs=4,
        num_actual_tokens=int(qsl[-1]), max_query_len=7, max_seq_len=700,
        block_table_tensor=torch.arange(4 * 3, dtype=torch.int32).view(4, 3),
        slot_mapping=torch.arange(int(qsl[-1])), positions=torch.arange(int(qsl[-1])),
        seq_lens_cpu_upper_bound=seq, **extra)


def test_subset_rebases_queries_and_keeps_rows():
    from vllm_trianglemix.compat import subset_common_metadata

    cam = metadata()
    reqs = torch.tensor([0, 2])
    toks = torch.tensor([0, 6])
    sub = subset_common_metadata(cam, reqs, toks, torch.tensor([1, 1]))
    assert sub.num_reqs == 2 and sub.num_actual_tokens == 2 and sub.max_query_len == 1
    assert sub.query_start_loc_cpu.tolist() == [0, 1, 2]
    assert sub.seq_lens.tolist() == [40, 12] and sub.max_seq_len == 40
    assert sub.block_table_tensor.tolist() == [[0, 1, 2], [6, 7, 8]]
    assert sub.slot_mapping.tolist() == [0, 6]


@pytest.mark.parametrize("field,value", [
    ("causal", torch.tensor([True, False, True, True])),
    ("mm_req_doc_ranges", {1: [(0, 3)]}),
])
def test_unknown_per_request_fields_refuse_to_split(field, value):
    from vllm_trianglemix.compat import subset_common_metadata

    names = {f.name for f in dataclasses.fields(metadata())}
    if field not in names:
        pytest.skip(f"this vLLM has no {field}")
    cam = dataclasses.replace(metadata(), **{field: value})
    assert subset_common_metadata(cam, torch.tensor([0]), torch.tensor([0]), torch.tensor([1])) is None
