"""Operator plumbing: merge patches, CLI configuration, development certificates, kopf wiring."""

from __future__ import annotations

import asyncio
import copy
import ssl
from pathlib import Path
from typing import Any

import kopf
from hypothesis import given
from hypothesis import strategies as st

from vmha_operator import cli, handlers, kube, webhooks
from vmha_operator.certs import write_development_certificates
from vmha_operator.reconcile import merge_patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, to check our diff against."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


json_values = st.recursive(
    st.one_of(st.booleans(), st.integers(), st.text(max_size=5)),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3)
    ),
    max_leaves=10,
)
objects = st.dictionaries(st.text(max_size=3), json_values, max_size=4)


@given(objects, objects)
def test_merge_patch_turns_old_into_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    assert apply_merge_patch(old, merge_patch(old, new)) == new


def test_merge_patch_is_empty_without_change() -> None:
    body = {"a": {"b": [1, 2]}, "c": "d"}
    assert merge_patch(body, copy.deepcopy(body)) == {}


def test_cli_builds_the_configuration() -> None:
    args = cli.parser().parse_args(
        [
            "--kubeconfig",
            "/tmp/kc",
            "-n",
            "a",
            "-n",
            "b",
            "--webhook-port",
            "0",
            "--webhook-host",
            "127.0.0.1",
            "--webhook-manage",
            "vmha-test.vmha.io",
            "--hook-image",
            "shim:1",
        ]
    )
    config = cli.config_from_args(args)
    assert config.namespaces == ("a", "b") and config.covers("a") and not config.covers("c")
    assert config.webhook.port == 0 and config.webhook.managed == "vmha-test.vmha.io"
    assert config.channel.hook_image == "shim:1"
    assert cli.config_from_args(cli.parser().parse_args([])).covers("anything")


def test_development_certificates_serve_tls_the_ca_trusts(tmp_path: Path) -> None:
    files = write_development_certificates(tmp_path, ["127.0.0.1", "localhost"])
    assert files.key_file.stat().st_mode & 0o077 == 0

    async def handshake() -> bytes:
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_context.load_cert_chain(files.cert_file, files.key_file)

        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"ok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        client_context = ssl.create_default_context(cafile=str(files.ca_file))
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="127.0.0.1"
            )
            data = await reader.read()
            writer.close()
            return data

    assert asyncio.run(asyncio.wait_for(handshake(), 30)) == b"ok"


def test_development_certificates_fill_in_only_what_is_missing(tmp_path: Path) -> None:
    config = cli.config_from_args(cli.parser().parse_args(["--webhook-host", "127.0.0.1"]))
    filled = cli.with_development_certificates(config, tmp_path)
    assert filled.webhook.ca_file and Path(filled.webhook.ca_file).exists()
    given_cert = cli.config_from_args(
        cli.parser().parse_args(["--webhook-cert-file", "c", "--webhook-key-file", "k"])
    )
    assert cli.with_development_certificates(given_cert, tmp_path) is given_cert


def test_registry_serves_the_documented_webhooks() -> None:
    registry = handlers.build_registry(cli.config_from_args(cli.parser().parse_args([])))
    webhooks = {str(h.id): h for h in registry._webhooks.get_all_handlers()}
    assert set(webhooks) == set(handlers.WEBHOOK_IDS)
    assert set(webhooks[handlers.VALIDATE_GROUP].operations or ()) == {"UPDATE", "DELETE"}
    assert webhooks[handlers.MUTATE_VM].selector is not None


def test_settings_point_kopf_at_our_webhook_server(tmp_path: Path) -> None:
    config = cli.with_development_certificates(
        cli.config_from_args(
            cli.parser().parse_args(["--webhook-port", "0", "--webhook-manage", "x.vmha.io"])
        ),
        tmp_path,
    )
    settings = handlers.build_settings(config)
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer)
    assert (server.addr, server.port, server.host) == ("127.0.0.1", None, "127.0.0.1")
    assert settings.admission.managed == "x.vmha.io" and not settings.posting.enabled


def test_production_webhooks_match_the_handlers() -> None:
    registry = handlers.build_registry(cli.config_from_args(cli.parser().parse_args([])))
    registered = {str(h.id): h for h in registry._webhooks.get_all_handlers()}
    assert {w.id for w in webhooks.WEBHOOKS} == set(registered)
    for webhook in webhooks.WEBHOOKS:
        handler = registered[webhook.id]
        assert handler.reason is not None and handler.reason.value == webhook.kind
        assert tuple(handler.operations or ()) == webhook.operations
        assert bool(handler.side_effects) == webhook.side_effects
        assert handler.selector is not None
        group, version, plural = webhook.resource
        assert (handler.selector.group, handler.selector.version) == (group, version)
        assert plural in (handler.selector.plural, handler.selector.any_name)


def test_production_webhook_configurations() -> None:
    mutating, validating = webhooks.webhook_configurations("vmha", "vmha-operator", "vmha", "Q0E=")
    assert mutating["kind"] == "MutatingWebhookConfiguration"
    assert [w["name"] for w in mutating["webhooks"]] == ["mutate-virtualmachine.vmha.io"]
    assert [w["clientConfig"]["service"]["path"] for w in validating["webhooks"]] == [
        "/validate-virtualmachine",
        "/validate-vmgroup",
        "/validate-migration",
    ]
    assert mutating["webhooks"][0]["objectSelector"] == {
        "matchExpressions": [{"key": "vmha.io/group", "operator": "Exists"}]
    }


def test_resource_paths_and_error_classes() -> None:
    assert kube.VMGROUPS.path("prod", "web", "status") == (
        "/apis/vmha.io/v1alpha1/namespaces/prod/vmgroups/web/status"
    )
    assert kube.CONFIGMAPS.path("prod") == "/api/v1/namespaces/prod/configmaps"
    assert [kube.ApiError(s, {}, "GET", "/").transient for s in (404, 409, 429, 503)] == [
        False,
        True,
        True,
        True,
    ]
    assert "GET /x: 403 nope" in str(kube.ApiError(403, {"message": "nope"}, "GET", "/x"))
