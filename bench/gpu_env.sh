# Source on the lent GPU machine (no package registry there): unpack the Mamba-2 kernels and the carried wheels.
#   . bench/gpu_env.sh && align pipeline configs/gpu/pipeline.yaml run_dir=$OUT/pipeline
# Expects .gpu/kernels-mamba2.tar.xz, optional .gpu/*.whl and .gpu_extra/*.tar.xz (see README "GPUs").
if [ ! -f .gpu/kernels-mamba2.tar.xz ]; then
  echo "bench/gpu_env.sh: .gpu/kernels-mamba2.tar.xz is missing (carry .gpu and .gpu_extra to the GPU machine)" >&2
  return 1 2>/dev/null || exit 1
fi
mkdir -p /tmp/kern /tmp/site
[ -f /tmp/kern/.done ] || { xz -dc .gpu/kernels-mamba2.tar.xz | tar xf - -C /tmp/kern && touch /tmp/kern/.done; }
if [ ! -f /tmp/site/.done ]; then
  # Marked done only when every wheel installed (pip installs none when one does not fit this Python).
  installed=1
  if ls .gpu/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl || installed=0
  fi
  for bundle in .gpu_extra/*.tar.xz; do [ -f "$bundle" ] && xz -dc "$bundle" | tar xf - -C /tmp/site; done
  [ "$installed" = 1 ] && touch /tmp/site/.done
fi
# The project itself, editable, so that its console scripts (`align`) exist as after `pip install -e .`.
if [ ! -f /tmp/site/.project ]; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/tmp/site/project-install.log 2>&1 \
    && touch /tmp/site/.project || echo "bench/gpu_env.sh: pip install -e . failed (see /tmp/site/project-install.log)" >&2
fi
export PYTHONPATH=/tmp/kern:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
# Processes started without PYTHONPATH (a console script run as a user would) find the kernels and wheels too.
python3 -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'gpu-bundle.pth').write_text('/tmp/kern\n/tmp/site\n')" \
  || echo "bench/gpu_env.sh: could not add /tmp/kern and /tmp/site to site-packages" >&2
export PATH=/tmp/site/bin:$PATH
align() { python3 -m alignment.cli "$@"; }
