"""Write a node's result as a BIDS derivative (the name comes from derivatives.OUTPUTS)."""
from __future__ import annotations

import json

from nipype.interfaces.base import (BaseInterfaceInputSpec, Directory, File, SimpleInterface,
                                    TraitedSpec, traits)

from .. import derivatives as drv


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    base_directory = Directory(mandatory=True, desc="the output (derivatives) dataset")
    subject = traits.Str(mandatory=True)
    session = traits.Str(desc="session label, if any")
    role = traits.Enum(*drv.OUTPUTS, mandatory=True, desc="which output this is")
    sources = traits.List(traits.Str, desc="BIDS URIs or paths the output was derived from")
    metadata = traits.Dict(desc="extra sidecar fields (e.g. column descriptions of a TSV)")
    metadata_file = File(exists=True, desc="JSON whose fields are added to the sidecar")
    write_sidecar = traits.Bool(True, usedefault=True,
                                desc="False where another output owns the sidecar of the same name")


class _SinkOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class DerivativesDataSink(SimpleInterface):
    """Copy into the derivatives tree atomically, with a JSON sidecar holding ``Sources``.

    The participant workflow points it at the unit's staging tree (see ``PublishUnit``); it always
    runs (a copy), so the staged set is complete even when the staging folder was cleaned.
    """

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        unit = drv.Unit(self.inputs.subject, self.inputs.session or None)
        target = drv.output_path(self.inputs.base_directory, unit, self.inputs.role)
        metadata = dict(self.inputs.metadata or {})
        if self.inputs.metadata_file:
            with open(self.inputs.metadata_file) as handle:
                metadata.update(json.load(handle))
        if not self.inputs.write_sidecar:
            drv.copy_file(self.inputs.in_file, target)
        else:
            drv.write_with_sidecar(target, lambda path: drv.copy_file(self.inputs.in_file, path),
                                   sources=list(self.inputs.sources or []), metadata=metadata)
        self._results["out_file"] = str(target)
        return runtime


class _PublishInputSpec(BaseInterfaceInputSpec):
    staging_directory = Directory(exists=True, mandatory=True, desc="where the unit's outputs were assembled")
    base_directory = Directory(mandatory=True, desc="the output (derivatives) dataset")
    subject = traits.Str(mandatory=True)
    session = traits.Str(desc="session label, if any")
    staged_files = traits.List(File(exists=True), mandatory=True,
                               desc="every staged output (orders this node after all the sinks)")
    report_file = File(exists=True, desc="the staged HTML report, when there is one")


class _PublishOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))


class PublishUnit(SimpleInterface):
    """The unit's last node: move its complete set of outputs into the derivatives dataset at once.

    A real node (not an IdentityInterface, which nipype removes when it flattens the graph), so it
    waits for every sink; it always runs, because the output dir may have changed since it was cached.
    """

    input_spec = _PublishInputSpec
    output_spec = _PublishOutputSpec
    always_run = True

    def _run_interface(self, runtime):
        unit = drv.Unit(self.inputs.subject, self.inputs.session or None)
        files = list(self.inputs.staged_files) + ([self.inputs.report_file] if self.inputs.report_file else [])
        published = drv.publish_unit(self.inputs.staging_directory, self.inputs.base_directory, unit, files)
        self._results["out_files"] = [str(p) for p in published]
        return runtime
