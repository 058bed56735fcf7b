"""elasticsearch sink against the wire-level double (tests/servers/es_double.py).

No Elasticsearch or OpenSearch server can be installed on the CI machine, so
these tests run the official client over real HTTP against an in-process
double of the server.  No root needed.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from conntracct.config import parse_config  # noqa: E402
from conntracct.flow import DESTROY, NEW, UPDATE, FlowEvent  # noqa: E402
from conntracct.pipeline import SinkWorker  # noqa: E402
from conntracct.selfmetrics import Stats  # noqa: E402
from conntracct.sinks import create_sink  # noqa: E402
from conntracct.sinks.base import PermanentSinkError, TransientSinkError  # noqa: E402
from conntracct.sinks.elasticsearch import ElasticsearchSink, flow_document, index_templates  # noqa: E402
from tests.servers.es_double import EsDouble  # noqa: E402
from tests.unit.sample_flows import T0, flow  # noqa: E402

STOP = T0 + 5_000_000_000
DAY_INDEX = "conntracct-flows-2026.11.18"


def ended(flow_id: int, **fields) -> FlowEvent:
    return flow(DESTROY, flow_id=flow_id, stop_ns=STOP, **fields)


def hex_id(flow_id: int) -> str:
    return f"{flow_id:016x}"


def make_sink(url: str, extra: str = "") -> ElasticsearchSink:
    timeout = "" if "timeout:" in extra else ", timeout: 2s"
    config = parse_config(f"sinks: [{{type: elasticsearch, name: archive, hosts: ['{url}'], "
                          f"observer_hostname: test-host{timeout}{extra}}}]").sinks[0]
    return create_sink(config)


def make_worker(sink: ElasticsearchSink, stats: Stats, **settings) -> SinkWorker:
    config = sink.config.model_copy(update={
        "flush_interval": 0.02, "retry": sink.config.retry.model_copy(update={"backoff": 0.02, "max_backoff": 0.1}),
        **settings})
    return SinkWorker(sink.name, sink, config, stats.sink(sink.name))


def wait_for(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def run_pipeline(sink: ElasticsearchSink, events: list[FlowEvent], **settings) -> dict:
    """Offer the events to a worker, drain it, return the sink's pipeline counters."""
    stats = Stats()
    worker = make_worker(sink, stats, **settings)
    worker.start()
    for event in events:
        worker.offer(event)
    worker.close(time.monotonic() + 10)
    assert worker.join(10)
    return stats.snapshot()["sinks"][sink.name]


@pytest.fixture
def es():
    with EsDouble() as double:
        yield double


# -- documents, template, gzip -----------------------------------------------

def test_documents_arrive_with_exact_values_and_are_searchable(es):
    import elasticsearch

    snat = ended(1, reply=("198.51.100.2", "198.51.100.1", 80, 61000), labels={"direction": "forward"})
    v6 = ended(2, orig=("2001:db8:1::2", "2001:db8:2::2", 5353, 53), proto=17, tcp_state=0)
    sink = make_sink(es.url)
    sink.write([snat, v6])
    assert es.docs(DAY_INDEX) == {hex_id(1): flow_document(snat, "test-host"),
                                  hex_id(2): flow_document(v6, "test-host")}
    client = elasticsearch.Elasticsearch(es.url)
    client.indices.refresh(index="conntracct-flows-*")
    found = client.search(index="conntracct-flows-*", query={"term": {"source.nat.ip": "198.51.100.1"}})
    assert [hit["_id"] for hit in found["hits"]["hits"]] == [hex_id(1)]
    got = client.get(index=DAY_INDEX, id=hex_id(2))
    assert got["_source"]["network"]["type"] == "ipv6" and got["_version"] == 1
    # a retried batch never duplicates: same _id, a new version of the same document
    sink.write([snat])
    assert len(es.docs()) == 2 and client.get(index=DAY_INDEX, id=hex_id(1))["_version"] == 2
    assert sink.counters()["documents_written"] == 3


def test_template_is_installed_before_the_first_document(es):
    make_sink(es.url, ", index_live_flows: true").write([ended(1)])
    assert es.templates == index_templates("conntracct-flows", "daily", True)
    paths = [(r.method, r.path) for r in es.requests]
    assert paths.index(("PUT", "/_index_template/conntracct-flows")) < paths.index(("PUT", "/_bulk"))
    assert es.indices[DAY_INDEX].template == "conntracct-flows"
    assert es.indices["conntracct-flows-live"].template == "conntracct-flows-live"


def test_no_template_when_install_template_is_false(es):
    make_sink(es.url, ", install_template: false").write([ended(1)])
    assert es.templates == {} and len(es.docs()) == 1


@pytest.mark.parametrize("gzip", [True, False])
def test_gzip_request_bodies(es, gzip):
    make_sink(es.url, f", gzip: {str(gzip).lower()}").write([ended(i) for i in range(50)])
    bulk = next(r for r in es.requests if r.path == "/_bulk")
    assert (bulk.headers.get("content-encoding") == "gzip") is gzip
    assert (bulk.raw_length < len(bulk.body) / 4) is gzip     # NDJSON compresses well
    assert len(es.docs()) == 50


def test_data_stream_mode(es):
    sink = make_sink(es.url, ", index_mode: data_stream")
    events = [ended(1), ended(2)]
    sink.write(events)
    assert list(es.data_streams) == ["conntracct-flows"]
    assert all(name.startswith(".ds-conntracct-flows-") for name in es.indices)
    assert set(es.docs("conntracct-flows")) == {hex_id(1), hex_id(2)}
    sink.write(events)        # a retry: 409 on create means "already written", not an error
    assert len(es.docs("conntracct-flows")) == 2
    assert sink.counters()["documents_rejected"] == 0


def test_live_flows_are_upserted_and_marked_finished(es):
    sink = make_sink(es.url, ", index_live_flows: true")
    sink.write([flow(NEW, flow_id=7), flow(UPDATE, flow_id=7, packets_orig=9)])
    live = es.docs("conntracct-flows-live")[hex_id(7)]
    assert (live["source"]["packets"], live["conntrack"]["finished"]) == (9, False)
    assert es.docs(DAY_INDEX) == {}
    sink.write([ended(7)])
    live = es.docs("conntracct-flows-live")[hex_id(7)]
    assert live["conntrack"]["finished"] is True and live["event"]["type"] == ["connection", "end"]
    assert es.docs(DAY_INDEX)[hex_id(7)] == flow_document(ended(7), "test-host")


def test_a_throttled_live_update_superseded_by_a_later_one_is_not_retried(es):
    es.throttle(hex_id(7))              # the NEW's upsert gets 429, the UPDATE after it succeeds
    sink = make_sink(es.url, ", index_live_flows: true")
    sink.write([flow(NEW, flow_id=7), flow(UPDATE, flow_id=7, packets_orig=9)])
    assert es.docs("conntracct-flows-live")[hex_id(7)]["source"]["packets"] == 9
    assert sink.counters()["documents_superseded"] == 1


# -- partial and whole-request failures ----------------------------------------

def test_rejected_items_are_dropped_and_counted_throttled_items_retried(es):
    es.reject(hex_id(2))                 # 400 document_parsing_exception, every time
    es.throttle(hex_id(4), times=2)      # 429 twice, then accepted
    sink = make_sink(es.url)
    snap = run_pipeline(sink, [ended(i) for i in range(1, 7)], batch_size=6)
    assert set(es.docs()) == {hex_id(i) for i in (1, 3, 4, 5, 6)}
    assert snap["emitted"] == 5 and snap["retries"] == 2
    assert snap["dropped_by"]["permanent_error"]["destroy"] == 1 and snap["dropped"] == 1
    assert sink.counters()["documents_rejected"] == 1
    bulks = [r for r in es.requests if r.path == "/_bulk"]
    assert len(bulks) == 3
    assert [json.loads(line)["index"]["_id"] for line in bulks[1].body.splitlines()[::2]] == [hex_id(4)]


def test_rejected_items_alone_are_a_partial_result_naming_the_sink(es):
    es.reject(hex_id(2))
    result = make_sink(es.url).write([ended(1), ended(2)])
    assert [e.flow_id for e in result.rejected] == [2] and not result.retry
    assert "'archive'" in result.reason and "document_parsing_exception" in result.reason


def test_throttled_items_narrow_the_retry(es):
    es.throttle(hex_id(2))
    result = make_sink(es.url).write([ended(1), ended(2), ended(3)])
    assert [e.flow_id for e in result.retry] == [2] and not result.rejected
    assert "429 es_rejected_execution_exception" in result.reason


def test_the_sink_keeps_no_failure_state_between_writes(es):
    """Throttled and rejected documents of one write are reported together;
    the next write sends exactly what it is given."""
    es.reject(hex_id(2))
    es.throttle(hex_id(3))
    sink = make_sink(es.url)
    result = sink.write([ended(1), ended(2), ended(3)])
    assert ([e.flow_id for e in result.retry], [e.flow_id for e in result.rejected]) == ([3], [2])
    assert sink.write([ended(3)]) is None
    assert set(es.docs()) == {hex_id(1), hex_id(3)}


@pytest.mark.parametrize("status", [429, 503])
def test_whole_request_errors_are_retried(es, status):
    es.fail_requests(status, count=2)
    sink = make_sink(es.url)
    with pytest.raises(TransientSinkError):
        sink.write([ended(1)])
    snap = run_pipeline(sink, [ended(2), ended(3)])
    assert set(es.docs()) == {hex_id(2), hex_id(3)}
    assert (snap["retries"], snap["emitted"], snap["dropped"]) == (1, 2, 0)


def test_timeout_is_transient():
    with EsDouble(delay=0.5) as es:
        with pytest.raises(TransientSinkError, match="timed out|Timeout"):
            make_sink(es.url, ", timeout: 200ms, install_template: false").write([ended(1)])


# -- credentials, URLs, product ----------------------------------------------

def test_basic_auth():
    with EsDouble(auth=("basic", "agent", "s3cret")) as es:
        make_sink(es.url, ", username: agent, password: s3cret").write([ended(1)])
        assert len(es.docs()) == 1
        with pytest.raises(PermanentSinkError) as info:
            make_sink(es.url, ", username: agent, password: wrong").write([ended(2)])
        message = str(info.value)
        assert "elasticsearch sink 'archive': bad credentials (401" in message
        assert "unable to authenticate user [agent]" in message


def test_api_key_from_the_environment(monkeypatch):
    with EsDouble(auth=("apikey", "aWQ6a2V5")) as es:
        monkeypatch.setenv("ES_API_KEY", "aWQ6a2V5")
        make_sink(es.url, ", api_key_env: ES_API_KEY").write([ended(1)])
        assert es.requests[-1].headers["authorization"] == "ApiKey aWQ6a2V5"
        with pytest.raises(PermanentSinkError, match="bad credentials"):
            make_sink(es.url).write([ended(2)])       # none at all
        assert len(es.docs()) == 1


def test_wrong_path_prefix_is_permanent_with_the_url():
    with EsDouble(path_prefix="/es") as es:
        make_sink(es.url + "/es", ", install_template: false").write([ended(1)])
        assert len(es.docs()) == 1
        with pytest.raises(PermanentSinkError) as info:
            make_sink(es.url + "/elastic", ", install_template: false").write([ended(2)])
        assert f"404 not found: bulk request at {es.url}/elastic/_bulk" in str(info.value)


def test_not_elasticsearch_is_a_clear_permanent_error():
    with EsDouble(product=False) as es:
        with pytest.raises(PermanentSinkError, match="is not Elasticsearch or runs an unsupported version"):
            make_sink(es.url).write([ended(1)])


def test_template_failure_does_not_crash_and_is_retried_before_the_next_write(es):
    es.fail_requests(503, paths=("/_index_template/conntracct-flows",))
    sink = make_sink(es.url)
    with pytest.raises(TransientSinkError, match="index template"):
        sink.write([ended(1)])
    assert es.indices == {}                 # nothing written without the template
    sink.write([ended(1)])
    assert es.templates and len(es.docs()) == 1
    assert (sink.counters()["template_failures"], sink.counters()["template_installs"]) == (1, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_then_up_queued_records_arrive():
    port = _free_port()
    sink = make_sink(f"http://127.0.0.1:{port}")
    stats = Stats()
    worker = make_worker(sink, stats, retry=sink.config.retry.model_copy(
        update={"max_attempts": 1000, "backoff": 0.02, "max_backoff": 0.05}))
    worker.start()
    for i in range(1, 21):
        worker.offer(ended(i))
    wait_for(lambda: stats.snapshot()["sinks"]["archive"]["retries"] >= 2)
    with EsDouble(port=port) as es:
        wait_for(lambda: len(es.docs()) == 20)
        worker.close(time.monotonic() + 5)
        assert worker.join(5)
    snap = stats.snapshot()["sinks"]["archive"]
    assert (snap["emitted"], snap["dropped"]) == (20, 0)
    assert sink.counters()["template_failures"] >= 2 and es.templates


# -- REST compatibility headers -------------------------------------------------

def _raw(url: str, accept: str) -> tuple[int, dict, dict]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_es8_double_rejects_compatible_with_9_like_the_server(es):
    status, headers, body = _raw(es.url, "application/vnd.elasticsearch+json; compatible-with=9")
    assert status == 400 and headers["X-Elastic-Product"] == "Elasticsearch"
    assert body["error"]["type"] == "media_type_header_exception"
    assert "must be either version 8 or 7, but found 9" in body["error"]["caused_by"]["reason"]
    status, headers, body = _raw(es.url, "application/vnd.elasticsearch+json; compatible-with=8")
    assert (status, headers["Content-Type"]) == (200, "application/vnd.elasticsearch+json;compatible-with=8")
    status, headers, _ = _raw(es.url, "application/json")
    assert (status, headers["Content-Type"]) == (200, "application/json")


def test_a_9x_client_against_elasticsearch_8_is_a_clear_permanent_error(es, monkeypatch):
    from elasticsearch._sync.client import _base

    # What the 9.x client does: the same substitution with its own major version.
    monkeypatch.setattr(_base, "_COMPAT_MIMETYPE_SUB", r"application/vnd.elasticsearch+\g<1>; compatible-with=9")
    with pytest.raises(PermanentSinkError, match="compatible-with header.*8.x Python client"):
        make_sink(es.url).write([ended(1)])
    assert es.requests[-1].headers["accept"] == "application/vnd.elasticsearch+json; compatible-with=9"
    assert es.requests[-1].status == 400 and es.templates == {}


@pytest.mark.parametrize("version", ["8.19.3", "9.1.5"])
def test_our_client_works_with_elasticsearch_8_and_9(version):
    with EsDouble(version=version) as es:
        make_sink(es.url).write([ended(1)])
        assert len(es.docs()) == 1
        assert {r.headers["accept"] for r in es.requests} == {"application/vnd.elasticsearch+json; compatible-with=8"}
