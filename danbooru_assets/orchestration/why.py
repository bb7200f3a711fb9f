"""``why_image``: why one image was kept or dropped, answered in the UI.

Jobs → ``why_image`` → Launchpad, ``image_id: 123042`` → Launch: the run's output shows the
verdict and the image's row in every stage table (the same as ``danbooru-assets why
123042``). It reads stored tables only; nothing is materialized.
"""


import dagster as dg
from pydantic import Field

from danbooru_assets.orchestration.resources import StorageResource


class WhyImageConfig(dg.Config):
    image_id: int = Field(description="The Danbooru post id, e.g. 123042 (shard 0042).")


@dg.op(
    out=dg.Out(dg.Nothing, description="Nothing stored: the verdict and the trace are this output's metadata."),
    description="The image's row in every stored stage table and where (and why) it left the pipeline.",
)
def why_image_op(context: dg.OpExecutionContext, config: WhyImageConfig, storage: StorageResource):
    from danbooru_assets.why import trace_image

    trace = trace_image(storage.base_path, config.image_id)
    context.log.info("\n".join(trace.lines()))
    return dg.Output(
        None,
        metadata={
            "image_id": config.image_id,
            "shard": trace.shard,
            "verdict": trace.verdict,
            "trace": dg.MetadataValue.md(trace.markdown()),
        },
    )


@dg.job(
    description="Why one image was kept or dropped: give image_id in the Launchpad; the run shows its row in "
    "every stage table. Reads stored tables only (the CLI: danbooru-assets why ID).",
)
def why_image():
    why_image_op()
