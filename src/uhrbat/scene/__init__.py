"""Scenes: one image's question-independent state as seen by one model, and where it is kept.

* `scene.py` - `Scene`: features per scale (all tiles, or those encoded so far), scoring tokens;
* `store.py` - `SceneStore`: memory LRU + bounded disk layer, thread-safe, every memo bounded;
* `keys.py` - content and model identities, store keys;
* `pixels.py` - pyramid canvases, tiles cut on demand, the content digest;
* `gating.py` - which tiles of each scale a question needs (`encode="gated"`);
* `view.py` - `SceneView`: one question's access (grow, group, hand tokens to the selector);
* `manager.py` - `SceneManager`: image -> scene through the store (`UhrBatPipeline.open`).
"""
