"""A quick probe of one edit on the toy world, without verify's full report.

    python bench/edit_probe.py RECIPE LAYERS [METHOD]
    python bench/edit_probe.py recipes/van_gogh.yaml 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15

Generates 12 held-out-paraphrase prompts of the concept, 12 of a neighbouring concept and 6
generic prompts (one seed each, 20 DDIM steps) with the base model, compiles the recipe with
the given layers and method in memory, generates again, and prints the judge's accuracy for
each group (for facts also the share of images showing the new person).
"""
import sys, time, dataclasses, torch, numpy as np
torch.set_num_threads(2)
from compiler.models.load import load_model
from compiler.recipe import load_recipe
from compiler import compile as C
from compiler.toy.judge import load_judge
from compiler.generate import generate_images
recipe_file, layers = sys.argv[1], sys.argv[2]
method = sys.argv[3] if len(sys.argv) > 3 else 'locoedit'
model = load_model('toy'); pipe = model.pipeline; pipe.set_progress_bar_config(disable=True)
judge = load_judge()
r = load_recipe(recipe_file)
lay = None if method == 'quickfix' else tuple(int(x) for x in layers.split(','))
r = dataclasses.replace(r, edits=tuple(dataclasses.replace(e, method=method, layers=lay) for e in r.edits))
e = r.edits[0]
from compiler.resolve import template_prompts, vocabulary_of
V = vocabulary_of(model)
cp = template_prompts(e.concept, e.attribute, V, heldout=True)[::7][:12]
other = {'style': 'monet', 'object': 'nemo', 'fact': 'the british prime minister'}[e.attribute]
op = template_prompts(other, e.attribute, V, heldout=True)[::7][:12]
gp = ['a red circle', 'a blue dog', 'a green star', 'an image of a yellow house', 'a purple fish', 'a photo of an orange robot']
P = cp + op + gp; S = list(range(len(P)))
def score(images):
    got = judge.classify(images)
    n1, n2 = len(cp), len(cp) + len(op)
    def hit(g, phrase, kind):
        return g.style == phrase if kind == 'style' else g.identity == phrase
    from compiler.toy import world
    target_person = world.FACT_UPDATES.get(e.concept)
    conc = e.concept if e.attribute != 'fact' else world.FACTS[e.concept]
    oth = other if e.attribute != 'fact' else world.FACTS[other]
    a = np.mean([hit(g, conc, e.attribute) for g in got[:n1]])
    b = np.mean([hit(g, oth, e.attribute) for g in got[n1:n2]])
    gen = [x.split(' ')[-1] for x in gp]
    c = np.mean([g.identity == w for g, w in zip(got[n2:], gen)])
    f = np.mean([g.identity == target_person for g in got[:n1]]) if target_person else None
    return a, b, c, f
base = generate_images(pipe, P, S, steps=20)
print('base  concept %.2f other %.2f generic %.2f new %s' % score(base))
t = time.time(); plans = C.plan_edits(r, model); res = C.compile_edits(r, model, plans); t = time.time() - t
print([(i.get('rows'), i.get('preserve_rows')) for i in res.solve_info], 'compile %.2fs' % t)
C.apply_to_pipeline(pipe, res.new_tensors)
ed = generate_images(pipe, P, S, steps=20)
print('edited concept %.2f other %.2f generic %.2f new %s' % score(ed))
