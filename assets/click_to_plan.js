() => {
  // Clicking a cell of the importance heatmap toggles that block in the plan: plotly's click event
  // writes "block:time" into a hidden textbox, whose change event the server handles.
  const onClick = (ev) => {
    const point = ev && ev.points && ev.points[0];
    if (!point || point.x === undefined) return;
    const box = document.querySelector("#plan-click-box textarea, #plan-click-box input");
    if (!box) return;
    box.value = `${point.x}:${Date.now()}`;
    box.dispatchEvent(new Event("input", { bubbles: true }));
  };
  const bind = () => {
    const plot = document.querySelector("#importance-plot .js-plotly-plot");
    if (!plot || typeof plot.on !== "function") return;
    // a redraw may drop listeners: re-bind whenever ours is missing, never twice
    const emitter = plot._ev;
    const bound = emitter && typeof emitter.listeners === "function"
      ? emitter.listeners("plotly_click").includes(onClick)
      : plot.dataset.fusegptBound === "1";
    if (bound) return;
    plot.on("plotly_click", onClick);
    plot.dataset.fusegptBound = "1";
  };
  setInterval(bind, 500);
}
