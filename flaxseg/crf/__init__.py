"""Dense CRF (Krähenbühl & Koltun 2011): Gaussian filters and mean-field.

Public API, re-exported from :mod:`flaxseg.crf.meanfield`,
:mod:`flaxseg.crf.filters` and :mod:`flaxseg.crf.rnn` (CRF-as-RNN); see those
modules for the maths and the
conventions shared with pydensecrf.
"""

from flaxseg.crf.filters import bilateral_features
from flaxseg.crf.filters import exact_filter
from flaxseg.crf.filters import position_features
from flaxseg.crf.filters import separable_spatial_filter
from flaxseg.crf.filters import window_filter
from flaxseg.crf.meanfield import BilateralKernel
from flaxseg.crf.meanfield import build_filters
from flaxseg.crf.meanfield import dense_crf
from flaxseg.crf.meanfield import GaussianKernel
from flaxseg.crf.meanfield import logits_from_probabilities
from flaxseg.crf.meanfield import meanfield_step
from flaxseg.crf.meanfield import pairwise_term
from flaxseg.crf.rnn import CRFasRNN
