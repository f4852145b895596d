// The demo's map view (uhrbat.serving.demo): a georeferenced upload on a Leaflet map with tiles
// cut from the upload itself (api/map/<id>/tiles/...), the kept tokens as a GeoJSON layer in their
// scale's colour, and a box tool (Leaflet-Geoman's rectangle) that asks about the box drawn.
// Images without a georeference keep the page's image view. State for tests and styles:
// body[data-map] = none | loading | ready | error, body[data-tokens] = number of token features.
(() => {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const view = {map: null, scene: null, tiles: null, tokens: null, box: null, legend: null, file: null};
  const BOX_STYLE = {color: '#f59e0b', weight: 2, fill: false, dashArray: null};

  function escapeHtml(text) {
    const div = document.createElement('div');
    div.textContent = text;
    return div.innerHTML;
  }
  function setState(s) { document.body.dataset.map = s; }
  function note(text) { $('mapnote').textContent = text; }
  function errorText(data, status) {
    return (data && data.error && (data.error.message || data.error)) || ('HTTP ' + status);
  }

  function clearBox() {
    if (view.box && view.map) view.map.removeLayer(view.box);
    view.box = null;
    $('region').value = ''; $('region_crs').value = '';
    $('region-label').textContent = 'Whole scene (draw a box to ask about a part of it)';
    $('clear-box').hidden = true;
    delete document.body.dataset.box;
  }

  function reset() {
    clearBox();
    if (view.map) view.map.remove();
    Object.assign(view, {map: null, scene: null, tiles: null, tokens: null, legend: null});
    $('scene').value = ''; $('mapview').hidden = true; note('');
    delete document.body.dataset.tokens;
    setState('none');
  }

  function setBox(layer) {
    if (view.box) view.map.removeLayer(view.box);
    view.box = layer;
    layer.setStyle(BOX_STYLE);
    const b = layer.getBounds();
    const region = [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()];
    $('region').value = region.join(','); $('region_crs').value = 'EPSG:4326';
    document.body.dataset.box = region.join(',');
    $('region-label').textContent = 'Box: ' + region.map((v) => v.toFixed(6)).join(', ') + ' (lon/lat)';
    $('clear-box').hidden = false;
    const form = $('form');
    if ($('ask').disabled) return;  // a question is running: the box is for the next one
    if ($('question').value.trim()) form.requestSubmit();
    else $('status').textContent = 'Type a question and press Ask to ask about the box';
  }

  function showScene(info) {
    const [w, s, e, n] = info.bounds;
    const bounds = L.latLngBounds([s, w], [n, e]);
    view.scene = info.id; $('scene').value = info.id;
    $('mapview').hidden = false;
    const map = L.map('map', {maxBounds: bounds.pad(1), zoomSnap: 0.25});
    view.map = map;
    // attributions are HTML: the file's name and CRS come from the upload, so they are escaped
    map.attributionControl.addAttribution(escapeHtml('tiles: ' + info.name + ' (' + info.crs + ')'));
    view.tiles = L.tileLayer(info.tiles, {
      tileSize: info.tile_size, bounds: bounds, noWrap: true,
      minNativeZoom: info.minzoom, maxNativeZoom: info.maxzoom,
      minZoom: Math.max(0, info.minzoom - 2), maxZoom: info.maxzoom + 3,
    }).addTo(map);
    map.fitBounds(bounds);
    map.on('pm:create', (ev) => setBox(ev.layer));
    note(info.name + ': ' + info.size.join('\u00d7') + ' px, ' + info.crs);
    setState('ready');
  }

  async function loadScene(file) {
    reset();
    view.file = file;
    if (!file || !/\.tiff?$/i.test(file.name)) return;  // PNG / JPEG carry no georeference here
    if (typeof L === 'undefined' || !L.PM) { note('Map view unavailable: its scripts did not load'); return; }
    setState('loading'); note('Opening ' + file.name + ' for the map view\u2026');
    const fd = new FormData(); fd.append('image', file);
    let info;
    try {
      const resp = await fetch('api/map', {method: 'POST', body: fd});
      info = await resp.json();
      if (!resp.ok) throw new Error(errorText(info, resp.status));
    } catch (e) {
      if (view.file !== file) return;
      setState('error'); note('Map view: ' + (e.message || e));
      return;
    }
    if (view.file !== file) return;  // another file was chosen meanwhile
    if (!info.georeferenced) { setState('none'); note('Image view: ' + info.reason); return; }
    showScene(info);
  }

  function legend(colours, counts) {
    if (view.legend) view.legend.remove();
    const ctl = L.control({position: 'bottomright'});
    ctl.onAdd = () => {
      const div = L.DomUtil.create('div', 'map-legend');
      for (const [scale, c] of Object.entries(colours)) {
        if (!counts[scale]) continue;
        const row = L.DomUtil.create('div', '', div);
        const sw = L.DomUtil.create('span', 'swatch', row);
        sw.style.borderColor = c; sw.style.background = c + '40';
        row.appendChild(document.createTextNode(scale + ' px scale: ' + counts[scale]));
      }
      return div;
    };
    view.legend = ctl.addTo(view.map);
  }

  // The result's kept tokens on the map (a promise; the page waits for it before "done").
  async function showTokens(data) {
    if (!view.map) return;
    if (!data.geojson_url.endsWith('.geojson')) throw new Error('the result has no map coordinates');
    const resp = await fetch(data.geojson_url);
    const doc = await resp.json();
    if (!resp.ok) throw new Error(errorText(doc, resp.status));
    if (view.tokens) view.map.removeLayer(view.tokens);
    const colours = data.scale_colours || {};
    const counts = {};
    view.tokens = L.geoJSON(doc, {
      pmIgnore: true,
      style: (f) => {
        const p = f.properties, c = colours[p.scale] || '#0072b2';
        return p.merged ? {color: c, weight: 1, dashArray: '4 3', fillOpacity: 0.05, className: 'token merged'}
          : {color: c, weight: 1.5, fillOpacity: 0.25, className: 'token kept'};
      },
      onEachFeature: (f, layer) => {
        const p = f.properties;
        counts[p.scale] = (counts[p.scale] || 0) + 1;
        layer.bindTooltip(p.status + ' token, scale ' + p.scale + ', score ' + p.score.toFixed(3));
      },
    }).addTo(view.map);
    if (view.box) view.box.bringToFront();
    legend(colours, counts);
    document.body.dataset.tokens = String(doc.features.length);
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('image').addEventListener('change', () => loadScene($('image').files[0]));
    $('draw-box').addEventListener('click', () => {
      if (view.map) view.map.pm.enableDraw('Rectangle', {snappable: false, pathOptions: BOX_STYLE});
    });
    $('clear-box').addEventListener('click', clearBox);
    setState('none');
  });

  window.uhrbatMap = {
    get map() { return view.map; },  // the Leaflet map (tests, the browser console)
    active: () => view.scene !== null,
    // In map mode a question names the kept scene (and the box) instead of uploading again.
    prepare: (fd) => {
      if (view.scene !== null) fd.delete('image');
      for (const k of ['scene', 'region', 'region_crs']) if (!fd.get(k)) fd.delete(k);
    },
    showTokens,
  };
})();
