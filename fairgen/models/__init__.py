"""Flax Linen models. They take hyperparameters, never the config.

``MODELS`` maps a model name to a builder ``(spec, **hyperparameters) -> modules``: a GAN
builder returns ``GanModules(generator, discriminator)``, a VAE builder a ``VAE`` module.
The objective that uses a model checks that the family fits. ``validate`` checks the
``model`` config section against the builder's signature (an unknown key is an error) and
the hyperparameters every family shares by name (sizes, widths, dropout rates); ``build``
calls the builder. Both live in ``registry.py``.

Adding a model is one new file: its network and a builder that registers itself with
``@MODELS.register(name)`` (its keyword arguments are the model's config keys, with their
defaults, and it checks their values), plus its line in the list below, which is the one
list of the package's model modules: importing ``fairgen.models`` imports them all, so the
registry is complete.
"""

from fairgen.models import dcgan
from fairgen.models import ddpmpp
from fairgen.models import dit
from fairgen.models import resnet_gan
from fairgen.models import tabgan
from fairgen.models import tabular
from fairgen.models import transformer
from fairgen.models import unet
from fairgen.models import vae
from fairgen.models import vfae
from fairgen.models.registry import DTYPES, GanModules, MODELS, build, validate

__all__ = ["DTYPES", "GanModules", "MODELS", "build", "validate"]
