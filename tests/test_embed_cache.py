import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.embed import EmbeddingCacheMismatch, Embeddings, read_embedding_cache, write_embedding_cache


def sample(n=5, h=8, seed=0) -> tuple[list[str], Embeddings]:
    rng = np.random.default_rng(seed)
    prompt = rng.standard_normal((n, h)).astype(np.float32)
    prompt[1] = np.nan  # a decoder run without prompt_end stores NaN prompts; they must survive
    return [f"row{i}-0" for i in range(n)], Embeddings(rng.standard_normal((n, h)).astype(np.float32), prompt, 123)


def test_round_trip_is_exact(tmp_path):
    ids, emb = sample()
    uri = str(tmp_path / "cache" / "part-0.parquet")
    write_embedding_cache(uri, ids, emb, "fp1234")
    got_ids, response, prompt = read_embedding_cache(uri, "fp1234")
    assert got_ids == ids
    assert response.dtype == np.float32 and np.array_equal(response, emb.response)
    assert np.array_equal(prompt, emb.prompt, equal_nan=True)
    table = pq.read_table(uri)
    assert table.column("backbone_fingerprint").to_pylist() == ["fp1234"] * 5
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["part-0.parquet"]  # no temp file left


def test_other_fingerprint_is_refused(tmp_path):
    ids, emb = sample()
    uri = str(tmp_path / "c.parquet")
    write_embedding_cache(uri, ids, emb, "fp-old")
    with pytest.raises(EmbeddingCacheMismatch, match="computed with backbone fp-old, not fp-new"):
        read_embedding_cache(uri, "fp-new")


def test_not_a_cache_and_bad_inputs_are_refused(tmp_path):
    import pyarrow as pa

    uri = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"unit_id": ["a"]}), uri)
    with pytest.raises(EmbeddingCacheMismatch, match="not an armolabel embedding cache"):
        read_embedding_cache(uri, "fp")
    ids, emb = sample()
    with pytest.raises(ValueError, match="unique"):
        write_embedding_cache(str(tmp_path / "x.parquet"), ["a"] * 5, emb, "fp")
    with pytest.raises(ValueError, match="unit ids"):
        write_embedding_cache(str(tmp_path / "x.parquet"), ids[:4], emb, "fp")


def test_round_trip_on_s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        options = {"endpoint_url": f"http://{host}:{port}"}
        import boto3

        boto3.client("s3", endpoint_url=options["endpoint_url"]).create_bucket(Bucket="emb")
        ids, emb = sample(n=3, h=4, seed=1)
        write_embedding_cache("s3://emb/run/part-0.parquet", ids, emb, "fpS3", storage_options=options)
        got_ids, response, prompt = read_embedding_cache("s3://emb/run/part-0.parquet", "fpS3", storage_options=options)
        assert got_ids == ids and np.array_equal(response, emb.response)
        assert np.array_equal(prompt, emb.prompt, equal_nan=True)
    finally:
        server.stop()
