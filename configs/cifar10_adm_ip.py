"""DDPM-IP baseline on CIFAR-10: input perturbation with gamma = 0.1."""
from configs import cifar10_adm


def get_config():
  config = cifar10_adm.get_config()
  config.input_perturbation.gamma = 0.1
  return config
