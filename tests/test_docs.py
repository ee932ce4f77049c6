"""Docs against the nodes: every node has a description, a tooltip on every input and output, a
help page in web/docs/ (generated from its schema; GFCG_WRITE_DOCS=1 rewrites them), and a row in
the README's short node table and in the full reference (docs/nodes.md); pyproject carries the
registry metadata. The pages themselves: the README stays a front page (at most 220 lines) that
links every page under docs/, and every relative link and image in the README and docs/*.md
points to a file in the repository."""
import os
import re
from urllib.parse import unquote

import pytest

from conftest import REPO

MAX_README_LINES = 220


def _pack_nodes(env):
    from comfyui_gfcg.nodes import NODES

    return {cls.GET_SCHEMA().node_id: env["reg"][cls.GET_SCHEMA().node_id].GET_NODE_INFO_V1() for cls in NODES}


@pytest.mark.comfy
def test_every_node_has_description_tooltips_and_a_current_help_page(env):
    from comfyui_gfcg.nodes.help_pages import help_page

    docs = REPO / "web" / "docs"
    nodes = _pack_nodes(env)
    assert len(nodes) == 13
    for nid, info in nodes.items():
        assert info["description"].strip(), nid
        for group in ("required", "optional"):
            for name, spec in info["input"].get(group, {}).items():
                assert (spec[1] if len(spec) > 1 else {}).get("tooltip"), f"{nid}.{name} has no tooltip"
        assert all(info["output_tooltips"]), nid
        page = help_page(info)
        if os.environ.get("GFCG_WRITE_DOCS"):
            docs.mkdir(parents=True, exist_ok=True)
            (docs / f"{nid}.md").write_text(page)
        assert (docs / f"{nid}.md").read_text() == page, f"web/docs/{nid}.md is stale: rerun with GFCG_WRITE_DOCS=1"
    assert sorted(p.stem for p in docs.glob("*.md")) == sorted(nodes)


@pytest.mark.comfy
@pytest.mark.parametrize("page", ["README.md", "docs/nodes.md"])
def test_node_tables_match_the_nodes(env, page):
    """The README's short table and the full reference in docs/nodes.md each list exactly the pack's
    nodes, once each, under their display names."""
    nodes = _pack_nodes(env)
    text = (REPO / page).read_text()
    rows = re.findall(r"^\| \*\*(.+?)\*\* \(`(\w+)`\) \|", text, flags=re.M)
    listed = {nid: name for name, nid in rows}
    assert len(rows) == len(listed), f"{page} lists a node twice"
    assert sorted(listed) == sorted(nodes), f"{page}'s node tables must list exactly the pack's nodes"
    for nid, name in listed.items():
        assert name == nodes[nid]["display_name"], f"{page} names {nid} {name!r}, the node says {nodes[nid]['display_name']!r}"


def _doc_pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _links(text):
    """The targets of markdown links and images, ``[..](target)`` and ``![..](target)``, outside code."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)   # fenced code blocks
    text = re.sub(r"`[^`\n]*`", "", text)                                     # inline code
    return re.findall(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)


def test_relative_links_and_images_point_to_files_in_the_repo():
    checked, broken = 0, []
    for page in _doc_pages():
        for target in _links(page.read_text()):
            if re.match(r"https?://", target) or target.startswith("#"):
                continue
            path = unquote(target.split("#", 1)[0])
            resolved = (page.parent / path).resolve()
            checked += 1
            if not resolved.is_relative_to(REPO.resolve()) or not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)
    assert checked > 20, checked     # the pattern still finds the pages' links


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    n = len(readme.splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; the front page keeps to {MAX_README_LINES}: move detail to docs/"
    linked = {(REPO / unquote(t.split("#", 1)[0])).resolve() for t in _links(readme) if not re.match(r"https?://|#", t)}
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link docs/{unlinked}"


@pytest.mark.comfy
def test_help_pages_are_served_by_the_server(server):
    import urllib.request

    url, _, _ = server
    page = urllib.request.urlopen(f"{url}/extensions/comfyui-gfcg/docs/GFCGGuider.md", timeout=30).read().decode()
    assert page.startswith("# GFCG Guider")


@pytest.mark.comfy
def test_pyproject_has_registry_metadata():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert meta["project"]["name"] and meta["project"]["version"] and meta["project"]["description"]
    # the licence: a LICENSE file that is the one declared
    assert meta["project"]["license"] == {"file": "LICENSE"}
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    assert "License :: OSI Approved :: MIT License" in meta["project"]["classifiers"]
    assert any(c.startswith("Operating System ::") for c in meta["project"]["classifiers"])
    assert any(c.startswith("Environment :: GPU ::") for c in meta["project"]["classifiers"])
    # the icon is the committed file, at the repository's raw address
    repo = meta["project"]["urls"]["Repository"].replace("https://github.com/", "")
    assert comfy["Icon"] == f"https://raw.githubusercontent.com/{repo}/main/docs/icon.png"
    assert (REPO / "docs" / "icon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # requires-comfyui: registry format (x.y.z parts), admitting both versions CI runs and 0.38
    from packaging.specifiers import SpecifierSet

    req = comfy["requires-comfyui"]
    assert all(re.fullmatch(r"(==|>=|<=|!=|~=|>|<)?\d+\.\d+\.\d+", part) for part in req.split(",")), req
    spec = SpecifierSet(req)
    assert all(v in spec for v in ("0.3.64", "0.33.0", "0.38.1")) and "0.3.63" not in spec
