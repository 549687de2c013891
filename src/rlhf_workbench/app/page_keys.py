"""The annotation page's keyboard handling and style, injected into the page head by :func:`rlhf_workbench.app.build.launch`.

Full ranking: a digit fills the next unranked trace, Backspace clears the last rank, Enter
submits, S skips. Pairwise mode (:mod:`rlhf_workbench.human.pairwise`): 1 / 2 / 3 = A better / B better
/ tie, S skips. Never while typing in a text box (the rationale).
"""

# Keyboard-first annotation. Active only while the Annotate tab is shown; never while typing in
# a text box (the rationale); inside a rank box the keys type normally and Enter submits.
KEYBOARD_JS = """
<script>
(() => {
  const visible = (el) => el && el.offsetParent !== null;
  const rankInputs = () => [...document.querySelectorAll('.rank-input input')].filter(visible);
  const setValue = (input, value) => {
    const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set;
    setter.call(input, value);
    input.dispatchEvent(new Event('input', {bubbles: true}));
    input.dispatchEvent(new Event('change', {bubbles: true}));
  };
  document.addEventListener('keydown', (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    const submit = document.querySelector('#submit-btn');
    const pairA = document.querySelector('#pair-a-btn');
    const t = e.target || document.body;
    const tag = (t.tagName || '').toLowerCase();
    if (visible(pairA)) {  // pairwise mode: 1 / 2 / 3 = A better / B better / tie, S skips
      if (tag === 'textarea' || tag === 'select' || t.isContentEditable) return;
      if (tag === 'input' && !['checkbox', 'radio', 'button'].includes(t.type)) return;
      const ids = {'1': '#pair-a-btn', '2': '#pair-b-btn', '3': '#pair-tie-btn'};
      if (ids[e.key]) { e.preventDefault(); document.querySelector(ids[e.key]).click(); }
      else if (e.key === 's' || e.key === 'S') { e.preventDefault(); document.querySelector('#skip-btn').click(); }
      return;
    }
    if (!visible(submit)) return;  // not on the Annotate page (or not logged in)
    if (tag === 'textarea' || tag === 'select' || t.isContentEditable) return;
    if (tag === 'input' && !['checkbox', 'radio', 'button'].includes(t.type)) {
      if (e.key === 'Enter' && t.closest('.rank-input')) { e.preventDefault(); submit.click(); }
      return;
    }
    if (/^[1-9]$/.test(e.key)) {
      const next = rankInputs().find((i) => i.value === '');
      if (next) { e.preventDefault(); setValue(next, e.key); }
    } else if (e.key === 'Backspace') {
      const filled = rankInputs().filter((i) => i.value !== '');
      if (filled.length) { e.preventDefault(); setValue(filled[filled.length - 1], ''); }
    } else if (e.key === 'Enter') {
      if (tag === 'button') return;  // the button's own Enter already clicks it
      e.preventDefault(); submit.click();
    } else if (e.key === 's' || e.key === 'S') {
      e.preventDefault(); document.querySelector('#skip-btn').click();
    }
  });
})();
</script>
"""

CSS = """
#item-header { font-size: 1.05em; }
#keys-help { opacity: 0.75; font-size: 0.9em; }
"""
