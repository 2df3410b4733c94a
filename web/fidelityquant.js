// FidelityQuant front-end extension: shows the text report that the Calibrate & Quantize, Load,
// Save and Compare nodes return ({"ui": {"text": [report]}}) in a read-only box on the node.
// No dependencies beyond ComfyUI's own front-end modules.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES = new Set([
  "FidelityQuantCalibrate",
  "FidelityQuantLoad",
  "FidelityQuantSave",
  "FidelityQuantCompare",
]);
const WIDGET_NAME = "fidelityquant_report";

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget) return widget;
  widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
  widget.serialize = false; // not stored in the workflow's widgets_values
  widget.options ??= {};
  widget.options.serialize = false; // not sent as a node input
  if (widget.inputEl) {
    widget.inputEl.readOnly = true;
    widget.inputEl.style.opacity = 0.75;
    widget.inputEl.style.fontFamily = "monospace";
  }
  return widget;
}

function showReport(node, text) {
  const widget = reportWidget(node);
  widget.value = text;
  requestAnimationFrame(() => {
    const [width, height] = node.computeSize();
    node.setSize([Math.max(node.size[0], width), Math.max(node.size[1], height)]);
    node.setDirtyCanvas?.(true, true);
  });
}

app.registerExtension({
  name: "FidelityQuant.Report",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData?.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text == null || text.length === 0) return;
      showReport(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
