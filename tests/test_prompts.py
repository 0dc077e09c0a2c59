"""Prompt files (encodings, comments, blank lines, errors naming the file and line), the prompt-set hash, shards
and `prompts_per_shard: auto`."""
import pytest

from nullcov.prompts import PromptFileError, prompt_set_sha256, read_prompts, split_into_shards


def test_blank_and_comment_lines_are_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# header\n\n  a cat  \n#skip\na dog\n\n")
    assert read_prompts(path) == ["a cat", "a dog"]


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"# only comments\n\n", "holds no prompts"),
     (b"ok\n\xff\xfe bad\n", "line 2: not UTF-8")],
)
def test_bad_prompt_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PromptFileError, match=message) as info:
        read_prompts(path)
    assert "prompts.txt" in str(info.value)


def test_shards_are_consecutive_and_stable_under_appending():
    prompts = [f"p{i}" for i in range(7)]
    assert split_into_shards(prompts, 3) == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6"]]
    grown = split_into_shards(prompts + ["p7", "p8", "p9"], 3)
    assert grown[:2] == split_into_shards(prompts, 3)[:2]
    with pytest.raises(ValueError, match="prompts_per_shard"):
        split_into_shards(prompts, 0)


def test_prompt_hash_depends_on_content_and_order():
    assert prompt_set_sha256(["a", "b"]) == prompt_set_sha256(["a", "b"])
    assert prompt_set_sha256(["a", "b"]) != prompt_set_sha256(["b", "a"])
    assert prompt_set_sha256(["ab"]) != prompt_set_sha256(["a", "b"])
