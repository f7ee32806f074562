"""Structure builders: functions that return the root group of a symbolic circuit."""

from pclayer.structures.hclt import chow_liu_tree, hclt, hclt_mixture, pairwise_mutual_information
from pclayer.structures.hmm import hmm
from pclayer.structures.mixture import mixture
from pclayer.structures.poon_domingos import poon_domingos
from pclayer.structures.rat_spn import rat_spn

__all__ = ["chow_liu_tree", "hclt", "hclt_mixture", "hmm", "mixture", "pairwise_mutual_information", "poon_domingos", "rat_spn"]
