"""The files around the Helm chart that need no cluster and no helm: the chart's copy of the
VMGroup CRD and kopf's peering CRDs, its values documented in docs/install.md, the
Dockerfiles, kind-config.yaml and the user's kind script (shellcheck-clean, pointing at files
that exist)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf._cogs.structs import references

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "charts" / "vmha"
INSTALL_DOC = REPO_ROOT / "docs" / "install.md"
KIND_SCRIPT = REPO_ROOT / "hack" / "kind-e2e.sh"
DOCKERFILES = sorted((REPO_ROOT / "images").glob("*.Dockerfile"))


def test_the_chart_ships_the_crds_of_crds_directory_through_symlinks() -> None:
    """One source of truth: crdgen writes crds/, the chart links to it (helm reads and
    packages what a link points to, with a notice on stderr)."""
    for source in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        link = CHART / "crds" / source.name
        assert link.is_symlink(), f"{link.relative_to(REPO_ROOT)} should link to {source}"
        assert link.resolve() == source.resolve()
        assert not Path(link.readlink()).is_absolute()  # works in any checkout


@pytest.mark.parametrize(
    ("file_name", "namespaced"),
    [("clusterkopfpeerings.kopf.dev.yaml", False), ("kopfpeerings.kopf.dev.yaml", True)],
)
def test_the_chart_ships_the_peering_crds_kopf_looks_for(file_name: str, namespaced: bool) -> None:
    """A standby operator peers through the resource kopf selects for its mode: cluster-wide
    (ClusterKopfPeering) or, serving some namespaces, namespaced (KopfPeering). kopf has no
    public name for these selectors; its internal ones are the truth."""
    crd = yaml.safe_load((CHART / "crds" / file_name).read_text())
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"
    (version,) = spec["versions"]
    resource = references.Resource(
        group=spec["group"],
        version=version["name"],
        plural=spec["names"]["plural"],
        kind=spec["names"]["kind"],
        singular=spec["names"]["singular"],
        namespaced=spec["scope"] == "Namespaced",
    )
    assert resource.namespaced is namespaced
    wanted = references.NAMESPACED_PEERINGS_K if namespaced else references.CLUSTER_PEERINGS_K
    other = references.CLUSTER_PEERINGS_K if namespaced else references.NAMESPACED_PEERINGS_K
    assert wanted.check(resource)
    assert not other.check(resource)
    # kopf writes its peers' keep-alives into a free-form status (no status subresource).
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert "subresources" not in version


# --- values: schema, values.yaml and docs/install.md agree ------------------------------------


def schema_leaves(node: dict[str, Any], defaults: Any, prefix: str = "") -> set[str]:
    """Paths of the values a person sets: scalars, lists and free-form objects, and objects
    whose default is empty (`issuerRef: {}` is documented as a whole)."""
    properties = node.get("properties")
    if not properties or defaults == {}:
        return {prefix}
    assert isinstance(defaults, dict), f"{prefix}: values.yaml has no object here"
    paths: set[str] = set()
    for key, child in properties.items():
        assert key in defaults, f"{prefix}.{key} is in values.schema.json, not in values.yaml"
        paths |= schema_leaves(child, defaults[key], f"{prefix}.{key}".lstrip("."))
    return paths


def documented_values() -> list[str]:
    """The keys in the first column of docs/install.md's values table: | `a.b` | ..."""
    return re.findall(r"^\| `([A-Za-z][\w.]*)` \|", INSTALL_DOC.read_text(), flags=re.MULTILINE)


def test_every_value_is_documented_once_in_install_md() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    leaves = schema_leaves(schema, values)
    documented = documented_values()
    assert sorted(set(documented)) == sorted(documented), "a value is documented twice"
    assert set(documented) == leaves, (
        f"not documented: {sorted(leaves - set(documented))}; "
        f"documented but not a value: {sorted(set(documented) - leaves)}"
    )


def test_values_yaml_holds_nothing_the_schema_does_not_know() -> None:
    """helm validates values against the schema too; this says where a new key is missing."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def check(node: dict[str, Any], value: Any, path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                check(node["properties"][key], child, f"{path}.{key}")

    check(schema, yaml.safe_load((CHART / "values.yaml").read_text()), "")


# --- Dockerfiles ------------------------------------------------------------------------------


def distribution(directory: Path) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((directory / "pyproject.toml").read_text())["project"]
    return project


def local_distributions() -> dict[str, Path]:
    return {
        distribution(path.parent)["name"]: path.parent
        for path in REPO_ROOT.glob("*/pyproject.toml")
        if "project" in tomllib.loads(path.read_text())
    }


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_each_image_installs_its_program_with_the_local_packages_it_needs(
    dockerfile: Path,
) -> None:
    text = dockerfile.read_text()
    copies = dict(re.findall(r"^COPY (?!--)(\S+) (/src/\S+)$", text, flags=re.MULTILINE))
    installed = re.search(r"^RUN /opt/vmha/bin/pip install (.+)$", text, flags=re.MULTILINE)
    assert installed, "no pip install of the sources"
    assert installed.group(1).split() == list(copies.values())
    directories = [REPO_ROOT / source for source in copies]
    names = {distribution(directory)["name"] for directory in directories}

    local = local_distributions()
    for directory in directories:
        for requirement in distribution(directory).get("dependencies", []):
            name = requirement_name(requirement)
            assert name not in local or name in names, f"{dockerfile.name} lacks {name}"

    entrypoint = re.search(r'^ENTRYPOINT \["([\w-]+)"\]$', text, flags=re.MULTILINE)
    assert entrypoint, "no ENTRYPOINT"
    scripts = {s for d in directories for s in distribution(d).get("scripts", {})}
    assert entrypoint.group(1) in scripts

    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1 :][: len(copies)] == [f"!{s}/" for s in copies]


# --- kind-config.yaml and hack/kind-e2e.sh ---------------------------------------------------


def test_kind_config_has_one_control_plane_and_two_workers() -> None:
    config = yaml.safe_load((REPO_ROOT / "kind-config.yaml").read_text())
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [node["role"] for node in config["nodes"]] == ["control-plane", "worker", "worker"]


def test_the_kind_script_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: hack/install-system-deps.sh installs it"
    result = subprocess.run(
        [shellcheck, "--severity=style", str(KIND_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout


def test_the_kind_script_pins_kubevirt_once_and_uses_files_that_exist() -> None:
    text = KIND_SCRIPT.read_text()
    assert len(re.findall(r"^KUBEVIRT_VERSION=", text, flags=re.MULTILINE)) == 1
    assert text.count("KUBEVIRT_VERSION") >= 3  # set, and used in the URL and the log
    paths = set(re.findall(r"\$repo_root/([\w./-]+)", text))
    assert {"kind-config.yaml", "charts/vmha", "examples/"} <= paths
    for path in paths:
        assert (REPO_ROOT / path).exists(), f"hack/kind-e2e.sh uses {path}, which is missing"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    port = re.search(r"^AGENT_METRICS_PORT=(\d+)$", text, flags=re.MULTILINE)
    assert port and int(port.group(1)) == values["nodeAgent"]["metrics"]["port"]
