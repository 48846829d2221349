"""``onnxfib view``: the page opened in a real headless Chromium, the figure's artists, bad input.

Truth is independent of the view: the planted lifts of tests/lifting.py (whose fibers are the
copies planted), and ``onnxfib inspect --json`` run as a separate process on the same model.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import sha256
from lifting import lift_layers, onnx_mlp

from onnxfib import api
from onnxfib.errors import UsageError
from onnxfib.partition import Partition
from onnxfib.viewer import (
    KINDS,
    LAYER_STOP,
    SINGLETON_COLOR,
    fiber_colors,
    figure,
    pack_labels,
    packed,
    recorded,
    view_data,
    write_page,
)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_mlp_lifted.onnx"
CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at "
                                    "/usr/bin/chromium (apt-get install chromium): no browser to open the page in")


def _planted(sizes: list[int], extra: list[int], seed: int = 0) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """A random Relu MLP of ``sizes`` lifted by ``extra`` copies per hidden layer; returns the
    lifted model and, per hidden layer, which original neuron each lifted neuron copies."""
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.uniform(-0.5, 0.5, o) for o in sizes[1:]]
    lifted_w, lifted_b, lifts = lift_layers(weights, biases, extra, rng)
    return onnx_mlp(lifted_w, lifted_b, "relu"), [lift.source for lift in lifts]


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    model, sources = _planted([10, 8, 6, 3], [5, 4])
    path = tmp_path_factory.mktemp("planted") / "planted.onnx"
    onnx.save(model, path)
    return path, sources


class _Elements(HTMLParser):
    """Every element of a dumped DOM: (tag, attributes, its own text)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], list[str]]] = []
        self._open: list[list[str]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        text: list[str] = []
        self.elements.append((tag, {k: v or "" for k, v in attrs}, text))
        if tag not in ("input", "meta", "br"):
            self._open.append(text)

    def handle_endtag(self, tag):
        if self._open:
            self._open.pop()

    def handle_data(self, data):
        if self._open:
            self._open[-1].append(data)

    def having(self, **wanted: str) -> list[tuple[str, dict[str, str], list[str]]]:
        return [e for e in self.elements if all(e[1].get(k.replace("_", "-")) == v for k, v in wanted.items())]


def _dom(page: Path, state: str = "", *offline: str) -> _Elements:
    """The page's DOM after its scripts ran, in headless Chromium, opened at ``#state``."""
    profile = page.parent / f"profile-{os.getpid()}"
    result = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         *offline, "--dump-dom", page.as_uri() + ("#" + state if state else "")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = _Elements(result.stdout)
    body = next(attrs for tag, attrs, _ in dom.elements if tag == "body")
    assert body.get("data-ready") == "1", "the page's script did not finish"
    assert "data-errors" not in body, body.get("data-errors")
    return dom


class _Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
    commands on fd 3, replies on fd 4, each JSON ending in NUL): real mouse and key events."""

    def __init__(self, page: Path, profile: Path) -> None:
        self._to_browser, self._from_browser = os.pipe(), os.pipe()
        # the child's ends above fd 9, so that making them fds 3 and 4 overwrites neither
        commands, replies = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (self._to_browser[0], self._from_browser[1]))
        os.close(self._to_browser[0])
        os.close(self._from_browser[1])

        self.process = subprocess.Popen(  # bash hands the pipes to chromium as its fds 3 and 4
            ["/bin/bash", "-c", f'exec "$0" "$@" 3<&{commands} 4>&{replies}', str(CHROMIUM), "--headless",
             "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "--window-size=1200,800", "about:blank"],
            pass_fds=(commands, replies), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(replies)
        self._buffer, self._id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", self.session)
        self.call("Page.enable", self.session)
        self.call("Page.navigate", self.session, url=page.as_uri())
        self.wait("document.body && document.body.dataset.ready === '1'")

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to_browser[1], json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                ready, _, _ = select.select([self._from_browser[0]], [], [], 60.0)
                assert ready, f"chromium did not answer {method} within 60 s"
                chunk = os.read(self._from_browser[0], 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") != self._id:
                self.events.append(reply)
                continue
            assert "error" not in reply, reply["error"]
            return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait(self, condition: str, seconds: float = 20.0) -> None:
        deadline = time.monotonic() + seconds
        while not self.js(f"!!({condition})"):
            assert time.monotonic() < deadline, f"timed out waiting for {condition}"
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        """A left click, as the mouse makes it, at the centre of the element ``selector`` names."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                       " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", self.session, type=kind, x=x, y=y, button="left", clickCount=1)

    def press(self, key: str, code: int) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", self.session, type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def errors(self) -> list[dict]:
        """Uncaught exceptions and console errors the page raised so far."""
        return [e for e in self.events if e.get("method") == "Runtime.exceptionThrown"
                or (e.get("method") == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")]

    def close(self) -> None:
        try:
            self.call("Browser.close")
        finally:
            self.process.wait(timeout=30)
            for fd in (self._to_browser[1], self._from_browser[0]):
                os.close(fd)


def _inspect(model: Path, eps: float, cli: bool = False) -> dict[str, dict]:
    """Per layer what ``onnxfib inspect --json`` prints: run as a process, or the api call it makes."""
    if not cli:
        return {layer.name: layer.to_dict() for layer in api.inspect(model, eps=eps)}
    result = subprocess.run([sys.executable, "-m", "onnxfib", "inspect", str(model), "--eps", str(eps), "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}


def _fills(dom: _Elements, tensor: str) -> list[str]:
    """Fill of each channel dot of ``tensor`` in the layer panel, by channel index."""
    dots = [attrs for tag, attrs, _ in dom.having(**{"class": "channel", "data_tensor": tensor})]
    return [d["fill"] for d in sorted(dots, key=lambda d: int(d["data-channel"]))]


def _same_classes(fills: list[str], labels: np.ndarray) -> bool:
    """Whether the dots' colors partition the channels as ``labels`` do, singletons grey."""
    labels = Partition(labels).labels
    sizes = np.bincount(labels)
    if any((fill == SINGLETON_COLOR) != (sizes[c] == 1) for fill, c in zip(fills, labels)):
        return False
    ids: dict[str, int] = {}
    keys = [ids.setdefault(fill, len(ids)) if sizes[c] > 1 else len(fills) + i
            for i, (fill, c) in enumerate(zip(fills, labels))]
    return Partition(keys) == Partition(labels)


def test_data_holds_the_planted_fibers_and_base(planted):
    path, sources = planted
    data = view_data(path, eps=0.0, layout=False)
    exact = data["analyses"][data["eps_values"].index(0.0)]
    for layer, source in zip(data["layers"][:2], sources):
        labels = exact["tensors"][layer["output"]]
        assert Partition(labels["fibers"]) == Partition(source)  # each planted fiber one color
        assert Partition(labels["base"]) == Partition(source)
    reports = {r["name"]: r for r in exact["layers"]}
    assert [reports[layer["name"]]["width_after"] for layer in data["layers"]] == [8, 6, 3]  # the base
    assert data["layers"][0]["next"] == [data["layers"][1]["name"]]
    assert json.loads(json.dumps(data)) == data  # plain JSON


@pytest.mark.slow
def test_package_view_returns_the_data_and_writes_the_page(planted, tmp_path, run_cli):
    """``onnxfib.view`` gives what ``onnxfib view --json`` writes (each planted fiber one color at
    eps 0), writes the page where asked, and never over the input."""
    import onnxfib

    path, sources = planted
    before = sha256(path)
    data = onnxfib.view(path, eps=0.2, path=tmp_path / "p.html")
    assert run_cli("view", path, "--eps", "0.2", "--json", "d.json").returncode == 0
    assert json.loads((tmp_path / "d.json").read_text()) == json.loads(json.dumps(data))
    assert "ONNXFIB_DATA" not in (tmp_path / "p.html").read_text() and (tmp_path / "p.html").stat().st_size > 1000
    exact = data["analyses"][data["eps_values"].index(0.0)]
    for layer, source in zip(data["layers"][:2], sources):
        assert Partition(exact["tensors"][layer["output"]]["fibers"]) == Partition(source)
    with pytest.raises(UsageError, match="input file"):
        onnxfib.view(path, path=path)
    assert sha256(path) == before


def test_edges_only_where_every_output_reads_every_input(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("W0", (4, 3, 3, 3)), ("W1", (4, 1, 3, 3)), ("W2", (2, 4, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv"), helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "W1"], ["c1"], name="depthwise", group=4),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Conv", ["r1", "W2"], ["y"], name="mix")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = view_data(model, eps=0.0, eps_values=(), layout=False)
    layers = {layer["name"]: layer for layer in data["layers"]}
    kernels = np.abs(numpy_helper.to_array(inits[0])).sum(axis=(2, 3))
    assert np.allclose(layers["conv"]["edges"], kernels / kernels.max(), atol=1e-3)  # |W| summed over the kernel
    assert layers["depthwise"]["edges"] is None  # one input channel per output: no full set of edges
    assert layers["conv"]["next"] == ["depthwise"] and layers["depthwise"]["next"] == ["mix"]


def test_a_model_without_layers_has_a_page_but_no_figure():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    data = view_data(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                     eps_values=())
    assert data["layers"] == [] and [n["op"] for n in data["layout"]["nodes"]] == ["input", "Relu", "output"]
    with pytest.raises(UsageError, match="no layer onnxfib analyses"):
        figure(data)


def test_fiber_colors_follow_the_partition():
    labels = [0, 1, 0, 2, 1, 3, 0]
    colors = fiber_colors(labels)
    assert colors[0] == colors[2] == colors[6] != colors[1] == colors[4]
    assert colors[3] == colors[5] == SINGLETON_COLOR != colors[0]


@needs_chromium
@pytest.mark.slow
def test_page_shows_inspects_figures_at_each_eps(tmp_path):
    page = write_page(view_data(DIGITS, eps=0.0, eps_values=(0.3,)), tmp_path / "digits.html")
    for eps in (0.0, 0.3):
        truth = _inspect(DIGITS, eps, cli=eps > 0)
        dom = _dom(page, f"eps={eps}&layer=/0/Gemm")
        nodes = {attrs["data-layer"]: attrs for tag, attrs, _ in dom.elements
                 if tag == "g" and "layer" in attrs.get("class", "").split()}
        assert set(nodes) == set(truth)  # every analysed layer, under inspect's name
        for name, layer in truth.items():
            attrs = nodes[name]
            assert int(attrs["data-fibers"]) == layer["fibers"] and int(attrs["data-covers"]) == layer["covers"]
            assert int(attrs["data-width-after"]) == layer["width_after"]
            assert (attrs["data-frozen"] or None) == layer["frozen"]
        lines = [" ".join(t) for _, a, t in dom.elements if a.get("class") in ("line1", "line2")]
        for layer in truth.values():
            assert f"{layer['op_type']}  {layer['width']} -> {layer['width_after']}" in lines
            assert f"fibers {layer['fibers']}  opfibers {layer['opfibers']}  covers {layer['covers']}" in lines
        fills = _fills(dom, truth["/0/Gemm"]["tensor"])  # the panel re-colored for this eps
        assert len(fills) == truth["/0/Gemm"]["width"]
        singles = fills.count(SINGLETON_COLOR)
        assert len(set(fills) - {SINGLETON_COLOR}) + singles == truth["/0/Gemm"]["fibers"]


@needs_chromium
@pytest.mark.slow
def test_panel_colors_are_the_planted_fibers_and_toggles(planted, tmp_path):
    path, sources = planted
    data = view_data(path, eps=0.0, eps_values=(0.5,))
    page = write_page(data, tmp_path / "planted.html")
    first, second = data["layers"][0], data["layers"][1]
    dom = _dom(page, f"eps=0&layer={first['name']}")
    assert _same_classes(_fills(dom, first["output"]), sources[0])
    assert _same_classes(_fills(dom, second["output"]), sources[1])  # the next layer's column
    exact = data["analyses"][data["eps_values"].index(0.0)]["tensors"]
    assert _fills(dom, first["output"]) == fiber_colors(exact[first["output"]]["fibers"])  # as the figure's
    assert len(_fills(dom, first["input"])) == 10
    assert dom.having(**{"class": "weights"})  # edges to and from the small layer
    base = _dom(page, f"eps=0&layer={first['name']}&base=1")
    assert len(_fills(base, first["output"])) == 8  # one dot per base channel: the original width
    truth = _inspect(path, 0.5)
    covers = _dom(page, f"eps=0.5&layer={first['name']}&kind=covers")
    fills = _fills(covers, first["output"])
    assert len(set(fills) - {SINGLETON_COLOR}) + fills.count(SINGLETON_COLOR) == truth[first["name"]]["covers"]


@needs_chromium
@pytest.mark.slow
def test_mouse_and_keys_drive_the_controls(tmp_path):
    page = write_page(view_data(DIGITS, eps=0.0, eps_values=(0.0, 0.1)), tmp_path / "digits.html")
    browser = _Browser(page, tmp_path / "profile")
    try:
        def fills(selector: str = "/0/Gemm_output_0") -> list[str]:
            return browser.js(f"[...document.querySelectorAll('circle[data-tensor=\"{selector}\"]')]"
                              ".sort((a, b) => a.dataset.channel - b.dataset.channel).map((c) => c.getAttribute('fill'))")

        def classes(colors: list[str]) -> int:
            return len(set(colors) - {SINGLETON_COLOR}) + colors.count(SINGLETON_COLOR)

        browser.click('g[data-layer="/0/Gemm"]')  # clicking a layer shows its channels
        browser.wait("document.getElementById('panel').dataset.layer === '/0/Gemm'")
        exact, tolerant = _inspect(DIGITS, 0.0)["/0/Gemm"], _inspect(DIGITS, 0.1)["/0/Gemm"]
        assert classes(fills()) == exact["fibers"]
        browser.js("document.getElementById('eps').focus()")
        browser.press("ArrowRight", 39)  # the eps slider, one step right: eps 0.1
        browser.wait("document.body.dataset.eps === '0.1'")
        assert classes(fills()) == tolerant["fibers"] != exact["fibers"]  # re-colored at the new eps
        browser.click('input[name=kind][value=covers]')
        browser.wait("document.body.dataset.kind === 'covers'")  # rendered
        assert classes(fills()) == tolerant["covers"]
        browser.click("#base")
        browser.wait("document.body.dataset.base === '1'")
        assert len(fills()) == tolerant["width_after"]  # one dot per base channel
        text = browser.js("document.querySelector('g[data-layer=\"/0/Gemm\"] .line1').textContent")
        assert text == f"Gemm  base width {tolerant['width_after']}"
        assert browser.errors() == []
    finally:
        browser.close()


@needs_chromium
@pytest.mark.slow
def test_wide_layer_histogram_counts_the_planted_fibers(tmp_path):
    model, sources = _planted([6, 100, 3], [200], seed=3)
    onnx.save(model, tmp_path / "wide.onnx")
    data = view_data(tmp_path / "wide.onnx", eps=0.0, eps_values=())
    page = write_page(data, tmp_path / "wide.html")
    dom = _dom(page, f"eps=0&layer={data['layers'][0]['name']}")
    bars = {int(a["data-size"]): int(a["data-count"]) for _, a, _ in dom.having(**{"class": "bar"})}
    sizes = np.bincount(sources[0])
    assert bars == {int(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True))}
    assert not dom.having(**{"class": "channel"})  # 300 channels: aggregated, no dots


@needs_chromium
@pytest.mark.slow
def test_page_is_self_contained(tmp_path):
    page = write_page(view_data(DIGITS, eps=0.1, eps_values=(0.0,)), tmp_path / "digits.html")
    html = page.read_text()
    assert not re.search(r"""(src|href|url)\s*[=(]\s*["']?\s*(https?:)?//""", html, re.IGNORECASE)
    assert "default-src 'none'" in html  # the page may load nothing, even if a script tried
    dom = _dom(page, "layer=/2/Gemm", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9")
    assert dom.having(data_layer="/2/Gemm")


def _gemm_weights(path: Path) -> dict[str, np.ndarray]:
    """Per Gemm node of the file at ``path``, its weight as rows out x columns in."""
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type == "Gemm":
            trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
            weights[node.name] = inits[node.input[1]] if trans else inits[node.input[1]].T
    return weights


def _nodes(dom: _Elements) -> dict[str, dict[str, str]]:
    """The graph's layer boxes by layer name: their data attributes."""
    return {attrs["data-layer"]: attrs for tag, attrs, _ in dom.elements
            if tag == "g" and "layer" in attrs.get("class", "").split()}


@needs_chromium
@pytest.mark.slow
def test_settings_of_a_compressed_model_is_the_stop_the_page_opens_at(planted, tmp_path, run_cli):
    path, _ = planted
    result = run_cli("compress", path, "small.onnx", "--target-params", "0.5", "--report", "run.json", "-q")
    assert result.returncode == 0, result.stderr
    report = {layer["name"]: layer for layer in json.loads((tmp_path / "run.json").read_text())["layers"]}
    assert len({layer["eps"] for layer in report.values()}) > 1  # the search chose eps per layer
    shapes = {name: w.shape for name, w in _gemm_weights(tmp_path / "small.onnx").items()}
    for settings in ("small.onnx", "run.json"):  # the model's metadata, or the run's report
        result = run_cli("view", path, "--settings-of", settings, "-o", "page.html")
        assert result.returncode == 0, result.stderr
        dom = _dom(tmp_path / "page.html")  # opens at the per-layer stop
        body = next(attrs for tag, attrs, _ in dom.elements if tag == "body")
        assert body["data-eps"] == LAYER_STOP
        nodes = _nodes(dom)
        assert set(nodes) == set(report)
        for name, layer in report.items():
            assert float(nodes[name]["data-eps"]) == layer["eps"]
            assert int(nodes[name]["data-width-after"]) == layer["width_after"]
            assert int(nodes[name]["data-compressed-width"]) == shapes[name][0]  # no layer regrouped
        base = _nodes(_dom(tmp_path / "page.html", "base=1"))  # the collapsed model's own widths
        assert {name: int(attrs["data-base-width"]) for name, attrs in base.items()} == \
            {name: shape[0] for name, shape in shapes.items()}
        assert [shapes[name][0] for name in report] == [layer["width_after"] for layer in report.values()]
    settings = recorded(tmp_path / "small.onnx")  # the static figure draws the same stop
    fig = figure(view_data(path, eps=settings.eps, layer_eps=settings.layer_eps, eps_values=(), layout=False))
    from matplotlib.colors import to_hex

    for collection in fig.axes[0].collections:
        if collection.get_gid() in report:
            fills = [to_hex(c) for c in collection.get_facecolors()]
            classes = len(set(fills) - {to_hex(SINGLETON_COLOR)}) + fills.count(to_hex(SINGLETON_COLOR))
            assert classes == report[collection.get_gid()]["fibers"]
    import matplotlib.pyplot as plt

    plt.close(fig)


@needs_chromium
@pytest.mark.slow
def test_a_layer_compressed_otherwise_than_its_recorded_eps_is_marked(planted, tmp_path, run_cli):
    path, _ = planted
    result = run_cli("compress", path, "small.onnx", "--layer-eps", "fc0=0.5", "--no-check", "-q")
    assert result.returncode == 0, result.stderr
    small = onnx.load(str(tmp_path / "small.onnx"))  # its metadata now claims eps 0 for fc0
    onnx.helper.set_model_props(small, {**{p.key: p.value for p in small.metadata_props},
                                        "onnxfib.layer_eps": json.dumps({"fc0": 0.0, "fc1": 0.0, "fc2": 0.0})})
    onnx.save(small, tmp_path / "claims.onnx")
    width = _gemm_weights(tmp_path / "claims.onnx")["fc0"].shape[0]
    exact = _inspect(path, 0.0)["fc0"]["width_after"]
    assert width < exact  # eps 0.5 merged more than eps 0 does
    result = run_cli("view", path, "--settings-of", "claims.onnx", "-o", "page.html")
    assert result.returncode == 0, result.stderr
    dom = _dom(tmp_path / "page.html")
    nodes = _nodes(dom)
    assert int(nodes["fc0"]["data-compressed-width"]) == width and int(nodes["fc0"]["data-width-after"]) == exact
    marks = [" ".join(t) for _, a, t in dom.elements if a.get("class", "").startswith("line") and "regrouped" in "".join(t)]
    assert marks == [f"compressed to {width}: regrouped, not by eps"]  # fc0 only


@needs_chromium
@pytest.mark.slow
def test_base_draws_the_collapsed_models_own_graph_and_weights(planted, tmp_path, run_cli):
    path, sources = planted
    result = run_cli("compress", path, "small.onnx", "--eps", "0", "-q")
    assert result.returncode == 0, result.stderr
    small = _gemm_weights(tmp_path / "small.onnx")
    data = view_data(path, eps=0.0, eps_values=())
    page = write_page(data, tmp_path / "planted.html")
    second = data["layers"][1]
    dom = _dom(page, f"eps=0&layer={second['name']}&base=1")
    assert next(a for t, a, _ in dom.elements if a.get("id") == "graph")["data-graph"] == "base"
    dots = dom.having(**{"class": "channel", "data_tensor": second["input"]})  # one per base channel
    assert sorted(int(a["data-size"]) for _, a, _ in dots) == sorted(np.bincount(sources[0]).tolist())
    weights = np.abs(small[second["name"]])
    drawn = {(int(a["data-to"]), int(a["data-from"])): float(a["data-weight"])
             for tag, a, _ in dom.elements if tag == "line" and "data-weight" in a
             and a.get("data-to") is not None and _in_group(dom, a, second["output"])}
    scaled = weights / weights.max()
    assert set(drawn) == {tuple(ij) for ij in np.argwhere(scaled > data["edge_floor"]).tolist()}
    assert all(abs(w - scaled[i, j]) <= 1e-3 for (i, j), w in drawn.items())  # the base's own weights


def _in_group(dom: _Elements, line: dict[str, str], tensor: str) -> bool:
    """Whether ``line`` is drawn in the weights group of ``tensor`` (groups precede their lines)."""
    group = None
    for tag, attrs, _ in dom.elements:
        if tag == "g" and attrs.get("class") == "weights":
            group = attrs.get("data-tensor")
        if attrs is line:
            return group == tensor
    return False


@needs_chromium
@pytest.mark.slow
def test_packed_page_unpacks_to_the_data(tmp_path):
    model, _ = _planted([6, 300, 100, 3], [20, 200], seed=4)  # 300 and 100 classes: 16- and 8-bit labels
    data = view_data(model, eps=0.0, eps_values=(), layout=True)
    assert {text[0] for text in packed(data)["partitions"]} >= {"i", "b", "h"}
    browser = _Browser(write_page(data, tmp_path / "wide.html"), tmp_path / "profile")
    try:
        seen = browser.js("DATA.analyses.map((a) => Object.fromEntries(Object.entries(a.tensors).map(([name, f]) =>"
                          f" [name, {json.dumps(list(KINDS))}.map((k) => labelsOf(f, k))])))")
        wide = Partition(np.r_[np.random.default_rng(0).permutation(70_000), 5]).labels.tolist()  # 32-bit labels
        assert pack_labels(wide)[0] == "w"
        assert browser.js(f"unpack({json.dumps(pack_labels(wide))})") == wide
        assert browser.errors() == []
    finally:
        browser.close()
    assert seen == [{name: [f[k] for k in KINDS] for name, f in a["tensors"].items()} for a in data["analyses"]]


@pytest.mark.slow
def test_layered_layout_without_dot(planted, tmp_path, monkeypatch):
    path, _ = planted
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no dot on the PATH
    data = view_data(path, eps=0.0, eps_values=())
    assert data["layout"]["engine"] == "layered" and "dot is not installed" in data["layout"]["note"]
    layers = {n["layer"] for n in data["layout"]["nodes"] if n["layer"]}
    assert layers == {layer["name"] for layer in data["layers"]}
    if CHROMIUM.exists():
        dom = _dom(write_page(data, tmp_path / "p.html"))
        note = next(text for _, a, text in dom.elements if a.get("id") == "note")
        assert "dot is not installed" in "".join(note)


def test_figure_draws_every_neuron_in_its_fiber_color(planted):
    path, sources = planted
    data = view_data(path, eps=0.0, layout=False)
    names = [layer["name"] for layer in data["layers"]]
    fig = figure(data)
    dots = {c.get_gid(): c for c in fig.axes[0].collections if c.get_gid()}
    assert list(dots) == [data["layers"][0]["input"], *names]
    for name, width in zip(dots, (10, 13, 10, 3)):
        assert len(dots[name].get_offsets()) == width  # one dot per neuron
    from matplotlib.colors import to_hex

    for name, source in zip(names[:2], sources):
        fills = [to_hex(c) for c in dots[name].get_facecolors()]
        assert _same_classes(fills, source)
    edges = [c for c in fig.axes[0].collections if not c.get_gid()]
    assert len(edges) == 3  # shaded weights between each pair of columns
    import matplotlib.pyplot as plt

    plt.close(fig)
    chosen = figure(data, layers=names[1:2])
    assert [c.get_gid() for c in chosen.axes[0].collections if c.get_gid()] == [data["layers"][1]["input"], names[1]]
    plt.close(chosen)


@pytest.mark.slow
def test_cli_writes_page_figure_and_json(planted, tmp_path, run_cli):
    path, _ = planted
    result = run_cli("view", path, "--eps", "0.2", "-o", "m.html", "--png", "m.png", "--svg", "m.svg", "--json", "m.json")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "m.svg").read_bytes()[:400]
    data = json.loads((tmp_path / "m.json").read_text())
    assert 0.2 in data["eps_values"] and data["eps"] == 0.2
    assert "ONNXFIB_DATA" not in (tmp_path / "m.html").read_text()


slow = pytest.mark.slow  # a CLI process each: one stays in the fast suite


@pytest.mark.parametrize("args, message", [
    pytest.param(["missing.onnx"], "missing.onnx", marks=slow),
    pytest.param(["{model}", "--eps", "2.5"], "eps must be in [0, 2)", marks=slow),
    pytest.param(["{model}", "--eps", "nan"], "eps must be in [0, 2)", marks=slow),
    (["{model}", "--png", "f.png", "--layers", "nope", "-o", "p.html"], "unknown layer(s) ['nope']"),
    pytest.param(["{model}", "-o", "{model}"], "output path is an input file", marks=slow),
    pytest.param(["{model}", "-o", "nodir/p.html"], "does not exist", marks=slow),
    pytest.param(["{model}", "-o", "same.html", "--json", "same.html"], "the output paths must differ", marks=slow),
    pytest.param(["{model}", "--settings-of", "{model}"], "records no onnxfib compress run", marks=slow),
    pytest.param(["{model}", "--layer-eps", "nope=0.1"], "unknown layer(s) ['nope']", marks=slow),
    pytest.param(["{model}", "--layer-eps", "fc0=0.1", "--settings-of", "{model}"], "give one", marks=slow),
])
def test_bad_input_is_one_line_and_writes_nothing(planted, tmp_path, run_cli, args, message):
    path, _ = planted
    model = tmp_path / "model.onnx"
    model.write_bytes(path.read_bytes())
    before = sha256(model)
    result = run_cli("view", *(a.format(model=model) for a in args))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"] and sha256(model) == before


@pytest.mark.slow  # imports torch and exports the model at every record
def test_tracker_animates_cover_formation_frame_by_frame(tmp_path):
    torch = pytest.importorskip("torch")
    from PIL import Image
    from train_planted import planted_mlp

    from onnxfib.train import CoverTracker

    model, planted = planted_mlp([6, 4, 4, 3], [[2, 1, 3, 1], [1, 2, 2, 1]], dtype=torch.float32, seed=0)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    tracker = CoverTracker(model, x, eps=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(3):
        tracker.record(step)
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()
    fig = tracker.frame(0)
    dots = {c.get_gid(): c for c in fig.axes[0].collections}
    from matplotlib.colors import to_hex

    for name, partition in zip(("0", "2"), planted):  # the planted covers, one color each
        fills = [to_hex(c) for c in dots[name].get_facecolors()]
        assert len(fills) == len(partition)
        sizes = sorted((fills.count(f) for f in set(fills) - {SINGLETON_COLOR}), reverse=True)
        assert sizes + [1] * fills.count(SINGLETON_COLOR) == sorted(partition.sizes().tolist(), reverse=True)
    import matplotlib.pyplot as plt

    plt.close(fig)
    with Image.open(tracker.animate(tmp_path / "covers.gif")) as gif:
        assert gif.n_frames == 3  # one frame per recorded step
