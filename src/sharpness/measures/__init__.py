"""Sharpness measures: Hessian spectra and traces, the papers' sharpness definitions, loss landscapes.

Every measure is a function of ``(model, loss_fn, data)`` returning a frozen :class:`Measurement`.
"""

from .hessian import (EIGEN_METHODS, EIGEN_ORDERS, PROBE_KINDS, dense_hessian, hessian_density,
                      hessian_eigenpairs, hessian_eigenvalues, hessian_frobenius, hessian_trace)
from .hvp import HVP_METHODS, HessianOperator, hvp
from .result import Measurement
from .definitions import (KESKAR_REGIONS, gnr_sharpness, keskar_sharpness, salr_sharpness, salr_sharpness_hat,
                          salr_stochastic_sharpness, sam_sharpness)
from .gradient_stats import gradient_variance, mean_squared_gradient_norm
from .landscape import (BIAS_BN, DIRECTION_NORMALIZATIONS, LossCurve, LossSurface, count_local_extrema,
                        filter_normalized_direction, interpolate, loss_along_direction, loss_surface,
                        plot_lines, plot_loss_curve, plot_loss_surface, random_direction)
from .universal import (MEASURES, GaussianSampler, ParameterFunction, SharpnessMeasure, SphereSampler,
                        UniformSampler, sharpness_measure, universal_sharpness)

__all__ = ["HVP_METHODS", "HessianOperator", "Measurement", "hvp"]
__all__ += ["EIGEN_METHODS", "EIGEN_ORDERS", "PROBE_KINDS", "dense_hessian", "hessian_density",
            "hessian_eigenpairs", "hessian_eigenvalues", "hessian_frobenius", "hessian_trace"]
__all__ += ["KESKAR_REGIONS", "gnr_sharpness", "keskar_sharpness", "salr_sharpness", "salr_sharpness_hat",
            "salr_stochastic_sharpness", "sam_sharpness", "gradient_variance", "mean_squared_gradient_norm"]
__all__ += ["BIAS_BN", "DIRECTION_NORMALIZATIONS", "LossCurve", "LossSurface", "count_local_extrema",
            "filter_normalized_direction", "interpolate", "loss_along_direction", "loss_surface",
            "plot_lines", "plot_loss_curve", "plot_loss_surface", "random_direction"]
__all__ += ["MEASURES", "GaussianSampler", "ParameterFunction", "SharpnessMeasure", "SphereSampler",
            "UniformSampler", "sharpness_measure", "universal_sharpness"]
