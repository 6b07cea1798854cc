import os

from relora_ds.config import reference_markdown
from tests.helpers import ROOT


def test_readme_config_reference_is_current():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert reference_markdown().strip() in readme, "regenerate README's config reference from reference_markdown()"


def test_readme_leads_with_the_two_commands():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert readme.index("make demo") < readme.index("## Train")
    assert "make test" in readme
