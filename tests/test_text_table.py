"""The text front end's case table: LLM-style input in English and Chinese and exactly what the
voice says for it, run through every path text takes to a voice:

- the front end itself (``realtime.text.normalize``),
- the default voice's path: its clause segmenter, then the normalisation call its engine makes on
  each clause (the words it says; the pauses between clauses are the engine's own),
- CosyVoice2's path: ``cosyvoice.text.StreamingNormalizer`` fed the text cut at random points
  (what the WebSocket bistream does), and ``normalize_text`` (HTTP and the Python API),

plus the properties behind them (spans cover the input in order and say what ``normalize`` says,
whatever the chunking), and the voice's languages over the real WebSocket and HTTP: text the
default voice cannot say is never dropped in silence.
"""

from __future__ import annotations

import json
import random
import re
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from cosyvoice.text import StreamingNormalizer, normalize_text
from realtime.engines import piper
from realtime.engines.piper import PiperEngine
from realtime.text import normalize, spans, unspeakable
from realtime.text.frontend import Incremental, ScriptWatch
from realtime.text.segment import ClauseSegmenter
from tests.serving import collect, serve, ws_url

# (what an LLM wrote, what the voice says)
EN: list[tuple[str, str]] = [
    ('Hello, world!', 'Hello, world!'),
    ('The meeting is at 3:45 pm.', 'The meeting is at three forty-five p.m.'),
    ("It's 10:30 a.m. now.", "It's ten thirty a.m. now."),
    ("Let's meet at 7pm.", "Let's meet at seven p.m."),
    ('The store opens at 9 AM and closes at 5:30 PM.', 'The store opens at nine a.m. and closes at five thirty p.m.'),
    ('It costs $12.50.', 'It costs twelve dollars and fifty cents.'),
    ("That's $1 exactly.", "That's one dollar exactly."),
    ('Only $0.99 today!', 'Only ninety-nine cents today!'),
    ('The budget is $2.5 million.', 'The budget is two point five million dollars.'),
    ('They raised $1.2M in seed funding.', 'They raised one point two million dollars in seed funding.'),
    ('Revenue hit €3,400 last month.', 'Revenue hit three thousand four hundred euros last month.'),
    ('A pint costs £4.75.', 'A pint costs four pounds and seventy-five pence.'),
    ('The price is ¥500.', 'The price is five hundred yen.'),
    ('Save $5/month with the annual plan.', 'Save five dollars per month with the annual plan.'),
    ('Prices range from $100-$200.', 'Prices range from one hundred dollars to two hundred dollars.'),
    ('The car goes 60 km/h.', 'The car goes sixty kilometers per hour.'),
    ('Light travels at 300,000 km/s.', 'Light travels at three hundred thousand kilometers per second.'),
    ('Wind speed: 5 m/s.', 'Wind speed: five meters per second.'),
    ("It's 25°C outside, about 77°F.", "It's twenty-five degrees Celsius outside, about seventy-seven degrees Fahrenheit."),
    ('Water boils at 100 °C.', 'Water boils at one hundred degrees Celsius.'),
    ('Humidity is 65%.', 'Humidity is sixty-five percent.'),
    ('Sales grew 12.5% year over year.', 'Sales grew twelve point five percent year over year.'),
    ('The range is 5-10%.', 'The range is five to ten percent.'),
    ('I weigh 70 kg.', 'I weigh seventy kilograms.'),
    ('Add 500 g of flour and 250 ml of milk.', 'Add five hundred grams of flour and two hundred fifty milliliters of milk.'),
    ('The bag weighs 1 kg.', 'The bag weighs one kilogram.'),
    ('It is 1 km away.', 'It is one kilometer away.'),
    ('The room is 20 m² in size.', 'The room is twenty square meters in size.'),
    ('The file is 2.5 GB.', 'The file is two point five gigabytes.'),
    ('My laptop has 16 GB of RAM and a 512 GB SSD.', 'My laptop has sixteen gigabytes of RAM and a five hundred twelve gigabytes SSD.'),
    ('The CPU runs at 3.2 GHz.', 'The CPU runs at three point two gigahertz.'),
    ('The download speed is 100 Mbps.', 'The download speed is one hundred megabits per second.'),
    ('It took 250 ms to load.', 'It took two hundred fifty milliseconds to load.'),
    ('The game runs at 60 fps.', 'The game runs at sixty frames per second.'),
    ('Call 555-0123 for details.', 'Call five five five, zero one two three for details.'),
    ('Call me at (555) 123-4567.', 'Call me at five five five, one two three, four five six seven.'),
    ('Our number is 555-123-4567.', 'Our number is five five five, one two three, four five six seven.'),
    ('International: +1 555 123 4567.', 'International: plus one, five five five, one two three, four five six seven.'),
    ('The deadline is 2024-03-15.', 'The deadline is March fifteenth, twenty twenty-four.'),
    ('Born on March 3, 1990.', 'Born on March third, nineteen ninety.'),
    ('The event is on Jan. 5th.', 'The event is on January fifth.'),
    ('See you on 12/25/2024.', 'See you on December twenty-fifth, twenty twenty-four.'),
    ('It happened on 4 July 1776.', 'It happened on the fourth of July, seventeen seventy-six.'),
    ('In 1999, things were different.', 'In nineteen ninety-nine, things were different.'),
    ('The year 2024 was busy.', 'The year twenty twenty-four was busy.'),
    ("Back in the 1980s and the '90s.", 'Back in the nineteen eighties and the nineties.'),
    ('She finished 1st, he came 2nd and I was 3rd.', 'She finished first, he came second and I was third.'),
    ('This is the 21st century.', 'This is the twenty-first century.'),
    ("It's my 100th post.", "It's my one hundredth post."),
    ('Chapter 11 starts on page 203.', 'Chapter eleven starts on page two hundred three.'),
    ('I have 3 apples and 21 pears.', 'I have three apples and twenty-one pears.'),
    ('There are 1,234,567 people.', 'There are one million two hundred thirty-four thousand five hundred sixty-seven people.'),
    ('The population is 8 billion.', 'The population is eight billion.'),
    ('Pi is about 3.14159.', 'Pi is about three point one four one five nine.'),
    ('The temperature dropped to -5 degrees.', 'The temperature dropped to minus five degrees.'),
    ("It's -12 outside.", "It's minus twelve outside."),
    ('A score of 0.5.', 'A score of zero point five.'),
    ('Use .5 cups of sugar.', 'Use zero point five cups of sugar.'),
    ('Agent 007 is here.', 'Agent zero zero seven is here.'),
    ('Version 2.0.1 is out.', 'Version two point zero point one is out.'),
    ('Upgrade to Python 3.12.', 'Upgrade to Python three point one two.'),
    ('Try GPT-4 or COVID-19 data.', 'Try GPT four or COVID nineteen data.'),
    ('Pages 10-20 cover it.', 'Pages ten to twenty cover it.'),
    ('From 9am-5pm daily.', 'From nine a.m. to five p.m. daily.'),
    ('The ratio is 16:9.', 'The ratio is sixteen to nine.'),
    ('Mix 2:1 water to rice.', 'Mix two to one water to rice.'),
    ('Rated 4.5/5 stars.', 'Rated four point five out of five stars.'),
    ('Add 1/2 cup of sugar.', 'Add one half cup of sugar.'),
    ('Use 3/4 of the dough.', 'Use three quarters of the dough.'),
    ("We're open 24/7.", "We're open twenty-four seven."),
    ('2+2=4', 'two plus two equals four'),
    ('3 * 4 = 12', 'three times four equals twelve'),
    ('10 / 2 = 5', 'ten divided by two equals five'),
    ('5 - 3 = 2', 'five minus three equals two'),
    ('7 × 8 = 56', 'seven times eight equals fifty-six'),
    ('x^2 + y^2', 'x squared plus y squared'),
    ('If x < 5, then y > 2.', 'If x is less than five, then y is greater than two.'),
    ('The answer is ≈ 42.', 'The answer is approximately forty-two.'),
    ('a ≠ b', 'a is not equal to b'),
    ('It takes ~5 minutes.', 'It takes about five minutes.'),
    ("I'm #1 in the rankings.", "I'm number one in the rankings."),
    ('Issue #42 was fixed.', 'Issue number forty-two was fixed.'),
    ('Dr. Smith will see you now.', 'Doctor Smith will see you now.'),
    ('Take Main St. to St. Louis.', 'Take Main Street to Saint Louis.'),
    ('Mr. and Mrs. Jones arrived.', 'Mister and Missus Jones arrived.'),
    ('Ms. Lee and Prof. Brown agree.', 'Miz Lee and Professor Brown agree.'),
    ('Bring fruit, e.g. apples or pears.', 'Bring fruit, for example apples or pears.'),
    ('One option, i.e. the best one.', 'One option, that is the best one.'),
    ('Apples, pears, etc.', 'Apples, pears, et cetera.'),
    ('Apples, pears, etc. are fruit.', 'Apples, pears, et cetera are fruit.'),
    ("It's apples vs. oranges.", "It's apples versus oranges."),
    ("It's approx. 5 km.", "It's approximately five kilometers."),
    ('Martin Luther King Jr. spoke.', 'Martin Luther King Junior spoke.'),
    ('Mt. Everest is tall.', 'Mount Everest is tall.'),
    ('Visit https://www.example.com/path?q=1 for more.', 'Visit example dot com for more.'),
    ('See http://docs.python.org/3/library/re.html today.', 'See docs dot python dot org today.'),
    ('Go to www.google.com now.', 'Go to google dot com now.'),
    ('Check github.com for the code.', 'Check github dot com for the code.'),
    ('Email me at john.doe@example.com.', 'Email me at john dot doe at example dot com.'),
    ('Contact support@company.io with questions.', 'Contact support at company dot io with questions.'),
    ('**Important:** read this first.', 'Important: read this first.'),
    ('This is *really* important.', 'This is really important.'),
    ('Use __init__ and _private names.', 'Use init and private names.'),
    ('~~Old text~~ New text.', 'Old text New text.'),
    ('Run `pip install numpy` first.', 'Run pip install numpy first.'),
    ('> This is a quote.', 'This is a quote.'),
    ('Read [the docs](https://docs.example.com) first.', 'Read the docs first.'),
    ('Here is an image: ![alt text](img.png)', 'Here is an image: alt text'),
    ('<b>Bold</b> and <i>italic</i> text.', 'Bold and italic text.'),
    ('Line one<br>Line two', 'Line one Line two'),
    ('Great job! 🎉', 'Great job!'),
    ('I love it ❤️ so much 😍😍', 'I love it so much'),
    ('Thumbs up 👍🏽 from me.', 'Thumbs up from me.'),
    ('Rock & roll.', 'Rock and roll.'),
    ('Tom &amp; Jerry', 'Tom and Jerry'),
    ('The snake_case_name variable.', 'The snake case name variable.'),
    ('Wait — really?', 'Wait, really?'),
    ('This is great - truly.', 'This is great, truly.'),
    ('Well... maybe.', 'Well... maybe.'),
    ('"Hello," she said.', '"Hello," she said.'),
    ("It's a dog's life.", "It's a dog's life."),
    ('Café au lait, naïve résumé.', 'Café au lait, naïve résumé.'),
    ('I have 2 cats and 1 dog.', 'I have two cats and one dog.'),
    ('Temperatures of 20-25°C are ideal.', 'Temperatures of twenty to twenty-five degrees Celsius are ideal.'),
    ('It\'s 5\'10" tall.', "It's five feet ten inches tall."),
    ('Shipping takes 3-5 business days.', 'Shipping takes three to five business days.'),
    ('The 2020s will be remembered.', 'The twenty twenties will be remembered.'),
    ('We sold 5k units.', 'We sold five thousand units.'),
    ('Streaming hit 10M users.', 'Streaming hit ten million users.'),
    ('Between 2010 and 2020.', 'Between twenty ten and twenty twenty.'),
    ('Q3 2024 results.', 'Q three twenty twenty-four results.'),
    ("It's 50/50.", "It's fifty-fifty."),
    ('Speed up by 3x.', 'Speed up by three times.'),
    ('About 1.5 hours.', 'About one point five hours.'),
    ('Take 2 tablets every 4 hours.', 'Take two tablets every four hours.'),
    ('Paris is 5,837 km away.', 'Paris is five thousand eight hundred thirty-seven kilometers away.'),
    ('The 3 biggest reasons are:', 'The three biggest reasons are:'),
    ('Step 1: preheat the oven to 350°F.', 'Step one: preheat the oven to three hundred fifty degrees Fahrenheit.'),
    ('Note: this is important.', 'Note: this is important.'),
    ("OK, let's go.", "OK, let's go."),
    ("I'm not sure.", "I'm not sure."),
    ('Yes! No? Maybe.', 'Yes! No? Maybe.'),
    ('The U.S. economy grew.', 'The U.S. economy grew.'),
    ('The NASA mission launched.', 'The NASA mission launched.'),
    ('He scored 98 out of 100.', 'He scored ninety-eight out of one hundred.'),
    ('Room 101.', 'Room one hundred one.'),
    ('Flight UA 123 departs at 6:05.', 'Flight UA one hundred twenty-three departs at six oh five.'),
    ('The code is 0042.', 'The code is zero zero four two.'),
    ('```python\nprint("hi")\n```\nThat prints hi.', 'print("hi") That prints hi.'),
    ('# Getting Started\n## Step 2: Install\nRun the installer.', 'Getting Started, Step two: Install, Run the installer.'),
    ('- First item\n- Second item\n* Third item', 'First item, Second item, Third item'),
    ('1. Open the app\n2. Click settings\n3. Save', 'Open the app, Click settings, Save'),
    ('| Name | Age |\n|------|-----|\n| Bob | 42 |', 'Name, Age, Bob, forty-two,'),
    ('Intro\n\n---\n\nOutro', 'Intro, Outro'),
    ('Here are the steps:\n\n1. Preheat to 180°C.\n2. Bake for 25 min.', 'Here are the steps: Preheat to one hundred eighty degrees Celsius. Bake for twenty-five minutes.'),
    ("Sure! Here's a summary:\n\n**Key points:**\n- Revenue: $4.2M\n- Growth: 15%", "Sure! Here's a summary: Key points: Revenue: four point two million dollars, Growth: fifteen percent"),
    ('The **total** is `$42`.', 'The total is forty-two dollars.'),
    ('Visit <a href="https://x.org">our site</a> today.', 'Visit our site today.'),
    ('I bought 2 lbs of apples.', 'I bought two pounds of apples.'),
    ('It was 3 ft long and 2 in wide.', 'It was three feet long and two in wide.'),
    ('The battery is 5000 mAh.', 'The battery is five thousand milliamp hours.'),
    ('A 1.5L bottle.', 'A one point five liters bottle.'),
    ('Burns 300 kcal per hour.', 'Burns three hundred kilocalories per hour.'),
    ('The motor spins at 3000 rpm.', 'The motor spins at three thousand revolutions per minute.'),
    ('The 5 biggest cities.', 'The five biggest cities.'),
    ('Version 10 is out.', 'Version ten is out.'),
    ('Call 1-800-555-0199 now.', 'Call one, eight zero zero, five five five, zero one nine nine now.'),
    ('At 12:00 we eat.', "At twelve o'clock we eat."),
    ('It ended at 11:59:59 pm.', 'It ended at eleven fifty-nine and fifty-nine seconds p.m.'),
    ('Meet at 3.45 pm.', 'Meet at three forty-five p.m.'),
    ('Sound is 80 dB.', 'Sound is eighty decibels.'),
    ('It costs $5 per month, or $50/year.', 'It costs five dollars per month, or fifty dollars per year.'),
    ('That was in Sept. 2021.', 'That was in September twenty twenty-one.'),
    ('On Dec 31, 1999 at midnight.', 'On December thirty-first, nineteen ninety-nine at midnight.'),
    ('Growth of -3.5% was reported.', 'Growth of minus three point five percent was reported.'),
    ('About 2/3 of people agree.', 'About two thirds of people agree.'),
    ('The tax is 7.25%.', 'The tax is seven point two five percent.'),
    ('Order No. 5 is ready.', 'Order number five is ready.'),
    ('Q: What is 2+2? A: 4.', 'Q: What is two plus two? A: four.'),
    ('Hello 👋 there!', 'Hello there!'),
    ('That’s “quoted” text.', 'That\'s "quoted" text.'),
    ('Wait... what?!', 'Wait... what?!'),
    ('He said—quite loudly—no.', 'He said, quite loudly, no.'),
    ('Use Ctrl+C to copy.', 'Use Ctrl plus C to copy.'),
    ('The ratio 3:2 is fine.', 'The ratio three to two is fine.'),
    ('In 2023-2024 we grew.', 'In twenty twenty-three to twenty twenty-four we grew.'),
    ("It's a 5-star hotel.", "It's a five-star hotel."),
    ('Use 3rd-party tools.', 'Use third-party tools.'),
    ("It's 10x faster.", "It's ten times faster."),
    ('Watch in 4K video.', 'Watch in four K video.'),
    ('Update to iOS 17 or Windows 11.', 'Update to iOS seventeen or Windows eleven.'),
    ('I code in C++ and C#.', 'I code in C plus plus and C sharp.'),
    ('Use .NET or node.js.', 'Use dot net or node.js.'),
    ("It's 1:30.", "It's one thirty."),
    ('Earn $50k/year.', 'Earn fifty thousand dollars per year.'),
    ('It is 0.1%.', 'It is zero point one percent.'),
    ('x = 5', 'x equals five'),
    ('f(x) = 2x + 1', 'f(x) equals two x plus one'),
    ('He\'s 6\'2".', "He's six feet two inches."),
    ('Call +44 20 7946 0958.', 'Call plus four four, two zero, seven nine four six, zero nine five eight.'),
    ("It's 11:00 AM EST.", "It's eleven a.m. EST."),
    ('Tickets: $25-$30.', 'Tickets: twenty-five dollars to thirty dollars.'),
    ('Temp: 98.6°F.', 'Temp: ninety-eight point six degrees Fahrenheit.'),
    ('1000s of users', 'thousands of users'),
    ('Python3 code', 'Python three code'),
    ('Follow #hashtag and @user.', 'Follow hashtag and at user.'),
    ('Sure! Here are **3 quick tips** for better sleep:\n\n1. **Keep a schedule** – go to bed at 10:30 PM and wake at 6:30 AM.\n2. Keep your room at ~18–20°C (64–68°F).\n3. Avoid caffeine after 2 p.m.; a 12-oz coffee has ~95 mg.\n\n> "Sleep is the best meditation." — Dalai Lama\n\nFor more, see [this guide](https://www.sleepfoundation.org/tips) or email help@sleep.org. 😴', 'Sure! Here are three quick tips for better sleep: Keep a schedule, go to bed at ten thirty p.m. and wake at six thirty a.m. Keep your room at about eighteen to twenty degrees Celsius (sixty-four to sixty-eight degrees Fahrenheit). Avoid caffeine after two p.m.; a twelve ounces coffee has about ninety-five milligrams. "Sleep is the best meditation.", Dalai Lama, For more, see this guide or email help at sleep dot org.'),
    ('The total comes to $1,249.99 (incl. 8.25% tax). Your order #A1234 ships on Dec 2nd via UPS; expect delivery in 3–5 business days. Questions? Call 1 (800) 555-0199, Mon–Fri 9am–5pm EST.', 'The total comes to one thousand two hundred forty-nine dollars and ninety-nine cents (including eight point two five percent tax). Your order number A one two three four ships on December second via UPS; expect delivery in three to five business days. Questions? Call one, eight zero zero, five five five, zero one nine nine, Monday to Friday nine a.m. to five p.m. EST.'),
    ('Open Mon-Sat.', 'Open Monday to Saturday.'),
    ('a 5-km run', 'a five kilometers run'),
]  # fmt: skip

# Chinese, read by CosyVoice2 (language "zh": Chinese through wetext and our fixes, English pieces
# through the English rules)
ZH: list[tuple[str, str]] = [
    ('你好，世界！', '你好，世界！'),
    ('今天是2024年3月15日。', '今天是二零二四年三月十五日。'),
    ('现在是下午3:45。', '现在是下午三点四十五分。'),
    ('会议在10:30开始。', '会议在十点三十分开始。'),
    ('我今天买了3个苹果。', '我今天买了三个苹果。'),
    ('这件衣服花了199元。', '这件衣服花了一百九十九元。'),
    ('价格是$12.50。', '价格是十二点五美元。'),
    ('一杯咖啡￥35。', '一杯咖啡三十五元。'),
    ('温度是25°C。', '温度是二十五摄氏度。'),
    ('气温降到-5℃。', '气温降到负五摄氏度。'),
    ('增长了12.5%。', '增长了百分之十二点五。'),
    ('比例是50%。', '比例是百分之五十。'),
    ('他跑了5公里。', '他跑了五公里。'),
    ('速度是60 km/h。', '速度是每小时六十公里。'),
    ('风速5 m/s。', '风速每秒五米。'),
    ('重量是70kg。', '重量是七十千克。'),
    ('我的电话是13812345678。', '我的电话是幺三八幺二三四五六七八。'),
    ('请拨打555-0123。', '请拨打五五五，零幺二三。'),
    ('他排名第1。', '他排名第一。'),
    ('第3章讲的是历史。', '第三章讲的是历史。'),
    ('大约~5分钟。', '大约五分钟。'),
    ('1/2的人同意。', '二分之一的人同意。'),
    ('人口约14亿。', '人口约十四亿。'),
    ('这是GPT-4模型。', '这是GPT四模型。'),
    ('**重点**：请看这里。', '重点：请看这里。'),
    ('# 标题', '标题'),
    ('1. 打开应用', '打开应用'),
    ('> 引用的话', '引用的话'),
    ('请看[文档](https://example.com)。', '请看文档。'),
    ('<b>粗体</b>文字', '粗体文字'),
    ('太棒了！🎉', '太棒了！'),
    ('我爱你❤️', '我爱你'),
    ('他说："你好。"', '他说："你好。"'),
    ('我喜欢 apple pie 和香蕉，', '我喜欢apple pie和香蕉。'),
    ('我用Python写代码。', '我用Python写代码。'),
    ('访问https://www.example.com了解更多。', '访问example点com了解更多。'),
    ('邮箱是test@example.com。', '邮箱是test艾特example点com。'),
    ('他出生于1990年。', '他出生于一九九零年。'),
    ('现在是2024年。', '现在是二零二四年。'),
    ('3-5天到货。', '三到五天到货。'),
    ('共有1,000人参加。', '共有一千人参加。'),
    ('圆周率约等于3.14。', '圆周率约等于三点一四。'),
    ('他考了98分。', '他考了九十八分。'),
    ('这个项目持续了3个月。', '这个项目持续了三个月。'),
    ('上午9点到下午5点。', '上午九点到下午五点。'),
    ('面积是20平方米。', '面积是二十平方米。'),
    ('我有2个孩子。', '我有两个孩子。'),
    ('第一，第二，第三。', '第一，第二，第三。'),
    ('这是一个测试。', '这是一个测试。'),
    ('- 第一项\n- 第二项', '第一项，第二项'),
    ('计算：3 * 4 = 12。', '计算：三乘四等于十二。'),
    ('答案是2+3=5。', '答案是二加三等于五。'),
    ('## 第二步：安装\n运行安装程序。', '第二步：安装，运行安装程序。'),
    ('1. 打开设置\n2. 点击保存', '打开设置，点击保存'),
    ('```\n代码\n```\n完成了。', '代码，完成了。'),
    ('你好，今天天气很好。我们下午三点见面。', '你好，今天天气很好。我们下午三点见面。'),
    ('这款手机售价4999元，屏幕6.7英寸。', '这款手机售价四千九百九十九元，屏幕六点七英寸。'),
    ('请在2024-03-15之前提交。', '请在二零二四年三月十五日之前提交。'),
    ('他的身高是180cm。', '他的身高是一百八十厘米。'),
    ('下载速度100MB/s。', '下载速度一百MB/s。'),
    ('我们团队有20多人。', '我们团队有二十多人。'),
    ('比分是3:2。', '比分是三比二。'),
    ('股价上涨了3.5%，收于¥128.60。', '股价上涨了百分之三点五，收于一百二十八点六元。'),
    ('**注意**：不要忘记带伞☔。', '注意：不要忘记带伞。'),
    ('今天气温15~20℃。', '今天气温十五到二十摄氏度。'),
    ('这本书有300页，我读了1/3。', '这本书有三百页，我读了三分之一。'),
    ('iPhone 15售价$799。', 'iPhone十五售价七百九十九美元。'),
    ('请联系客服：400-123-4567。', '请联系客服：四零零，幺二三，四五六七。'),
    ('他说“你好”，然后走了。', '他说“你好”，然后走了。'),
    ('我们在<i>北京</i>见面。', '我们在北京见面。'),
    ('请看第5页的图2。', '请看第五页的图二。'),
    ('会议将于明天上午10点召开。', '会议将于明天上午十点召开。'),
    ('我今年25岁。', '我今年二十五岁。'),
    ('总共花了1,250.5元。', '总共花了一千二百五十点五元。'),
    ('电话：021-12345678。', '电话：零二幺，幺二三四五六七八。'),
    ('好的👌，明白了。', '好的，明白了。'),
    ('用户增长了2倍。', '用户增长了两倍。'),
    ('这是第100次尝试。', '这是第一百次尝试。'),
    ('> 学而时习之，不亦说乎？', '学而时习之，不亦说乎？'),
    ('速度达到了每秒3万次。', '速度达到了每秒三万次。'),
    ('你好 ,、', '你好。'),
    ('我喜欢Python和JavaScript。', '我喜欢Python和JavaScript。'),
    ('今天是星期一。', '今天是星期一。'),
    ('一共有3种方法：A、B和C。', '一共有三种方法：A、B和C。'),
    ('好的！以下是**3个**建议：\n\n1. 每天晚上10:30前睡觉；\n2. 室温保持在18~20℃；\n3. 下午2点后不要喝咖啡，一杯约含95mg咖啡因。\n\n详情请访问https://www.example.com 或致电400-820-8820。😊', '好的！以下是三个建议：每天晚上十点三十分前睡觉；室温保持在十八到二十摄氏度；下午两点后不要喝咖啡，一杯约含九十五毫克咖啡因。详情请访问example点com或致电四零零，八二零，八八二零。'),
    ('下午2点半见。', '下午两点半见。'),
    ('时间是2024/03/15。', '时间是二零二四年三月十五日。'),
    ('版本v2.1.0发布了。', '版本v二点一点零发布了。'),
    ('比分2:1', '比分二比一'),
    ('增长率为-3.5%。', '增长率为负百分之三点五。'),
    ('一共$1,299.99。', '一共一千二百九十九点九九美元。'),
    ('3月15日下午3点半', '三月十五日下午三点半'),
    ('第2季度营收10亿美元', '第二季度营收十亿美元'),
    ('身高1.75米', '身高一点七五米'),
    ('快递单号SF1234567890。', '快递单号SF幺二三四五六七八九零。'),
    ('地址是北京市朝阳区建国路88号。', '地址是北京市朝阳区建国路八十八号。'),
    ('2小时30分钟', '两小时三十分钟'),
    ('他在2000年-2005年工作。', '他在二零零零年到二零零五年工作。'),
    ('温度25-30度。', '温度二十五到三十度。'),
    ('网址www.baidu.com', '网址baidu点com'),
    ('CPU使用率80%。', 'CPU使用率百分之八十。'),
    ('价格￥99.9起。', '价格九十九点九元起。'),
    ('电话（010）12345678', '电话零幺零，幺二三四五六七八'),
    ('#标签 很好', '标签很好'),
    ('**加粗**和*斜体*', '加粗和斜体'),
    ('`代码`示例', '代码示例'),
    ('有1/4的人', '有四分之一的人'),
    ('1985年出生', '一九八五年出生'),
    ('9:00-18:00营业', '九点到十八点营业'),
    ('21st世纪', '第二十一世纪'),
]  # fmt: skip


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'’.-]*\w", text.lower())


def _chunks(text: str, rng: random.Random) -> list[str]:
    cuts = (
        sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        if len(text) > 1
        else []
    )
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def test_the_table_is_big_and_has_no_duplicates():
    assert len(EN) >= 150 and len(ZH) >= 50
    assert len({t for t, _ in EN}) == len(EN) and len({t for t, _ in ZH}) == len(ZH)


def test_the_issues_examples_are_read_right():
    table = dict(EN)
    assert table["The car goes 60 km/h."] == "The car goes sixty kilometers per hour."
    assert table["Wind speed: 5 m/s."] == "Wind speed: five meters per second."
    assert table["Call 555-0123 for details."] == "Call five five five, zero one two three for details."
    assert table["3 * 4 = 12"] == "three times four equals twelve"
    assert table["It costs $12.50."] == "It costs twelve dollars and fifty cents."
    assert table["<b>Bold</b> and <i>italic</i> text."] == "Bold and italic text."
    assert table["Great job! 🎉"] == "Great job!"
    assert table["It takes ~5 minutes."] == "It takes about five minutes."  # not "tilde"
    # CosyVoice2 reads the same English the same way
    assert normalize_text("Call 555-0123, it costs $12.50 <b>now</b> 🎉") == normalize(
        "Call 555-0123, it costs $12.50 <b>now</b> 🎉"
    )


@pytest.mark.parametrize("text, said", EN)
def test_english_front_end(text, said):
    assert normalize(text) == said
    assert normalize(text, "en") == said


@pytest.mark.parametrize("text, said", EN)
def test_english_default_voice_path(text, said):
    # the engine normalises each clause its segmenter releases, with the front end
    assert piper.normalize is normalize
    segmenter = ClauseSegmenter()
    segments = segmenter.push(text) + segmenter.end()
    assert "".join(s.text for s in segments) == text
    clauses = " ".join(said for said in (piper.normalize(s.text) for s in segments) if said)
    if "\n" in text:  # it cuts at line breaks, and its pause there is the comma's
        assert _words(clauses) == _words(said)
    else:
        assert clauses == said


@pytest.mark.parametrize("text, said", EN + ZH)
def test_cosyvoice2_path(text, said):
    """CosyVoice2's whole-text and streaming normalisers, cut at random points, in both languages."""
    assert normalize_text(text) == said
    rng = random.Random(text)
    for _ in range(3):
        stream = StreamingNormalizer()
        assert "".join(stream.push(c) for c in _chunks(text, rng)) + stream.flush() == said


@pytest.mark.parametrize("text, said", ZH)
def test_chinese_front_end(text, said):
    assert normalize(text, "zh") == said


def test_the_default_voice_says_nothing_of_chinese_and_says_so():
    text = "你好，今天天气很好。我们下午三点见面。"
    assert normalize(text) == ""
    assert unspeakable(text, ["en"]) == ["你好，今天天气很好。我们下午三点见面"]
    assert unspeakable(text, ["zh", "en"]) == []
    assert unspeakable("Hello 你好 world, Привет 3 дня", ["en"]) == ["你好", "Привет", "дня"]
    assert unspeakable("こんにちは世界 and 안녕", ["zh", "en"]) == ["こんにちは", "안녕"]
    assert unspeakable("こんにちは世界 and 안녕", ["zh", "en", "ja", "ko"]) == []
    assert unspeakable("π ≈ 3.14, 5 µs 🎉", ["en"]) == []  # symbols are read, emoji are not text


# -- properties ------------------------------------------------------------------------------------

_FRAGMENTS = sorted({w for t, _ in EN + ZH for w in re.split(r"(\s+)", t) if w and not w.isspace()})
_SEPARATORS = ["", " ", " ", "\n", "\n\n", "  "]


@st.composite
def _texts(draw):
    n = draw(st.integers(1, 12))
    return "".join(draw(st.sampled_from(_FRAGMENTS)) + draw(st.sampled_from(_SEPARATORS)) for _ in range(n))


def _check_cover(text: str, got: list) -> None:
    at = 0
    for s in got:
        assert s.start == at and s.end > s.start, (text, got)
        at = s.end
    assert at == len(text)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_texts(), st.sampled_from(["en", "zh"]), st.randoms(use_true_random=False))
def test_spans_cover_the_input_in_order_and_say_what_normalize_says(text, language, rng):
    whole = spans(text, language)
    _check_cover(text, whole)
    assert "".join(s.spoken for s in whole) == normalize(text, language)
    front = Incremental(language)
    streamed = [s for piece in _chunks(text, rng) for s in front.push(piece)] + front.flush()
    assert streamed == whole  # the same spans, however the text was chunked
    assert not re.search(r"\d", normalize(text, language))


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=60), st.randoms())
def test_any_text_any_chunking(text, rng):
    for language in ("en", "zh"):
        whole = spans(text, language)
        _check_cover(text, whole)
        front = Incremental(language)
        assert [s for p in _chunks(text, rng) for s in front.push(p)] + front.flush() == whole
    watch = ScriptWatch(["en"])
    runs = [r for p in _chunks(text, rng) for r in watch.push(p)] + watch.close()
    assert runs == unspeakable(text, ["en"])


def test_a_token_said_as_one_unit_is_one_span():
    text = "At 3:45 pm pay $12.50, drive 60 km/h, call 555-0123 or see https://a.io/c now."
    units = {text[s.start : s.end]: s.spoken for s in spans(text) if s.spoken.strip()}
    assert units["3:45 pm"] == "three forty-five p.m."
    assert units["$12.50"] == "twelve dollars and fifty cents"
    assert units["60 km/h"].strip() == "sixty kilometers per hour"
    assert units["555-0123"].strip() == "five five five, zero one two three"
    assert units["https://a.io/c"].strip() == "a dot io"


# -- the voice's languages over the real service --------------------------------------------------


@pytest.fixture(scope="module")
def default_voice():
    with serve(PiperEngine()) as base:
        yield base


async def _speak(base: str, deltas: list[str], flush: bool = False) -> tuple[bytes, list[dict]]:
    async with connect(ws_url(base), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "pcm_s16le"}))
        assert json.loads(await ws.recv())["type"] == "ready"
        for d in deltas:
            await ws.send(json.dumps({"type": "text", "context_id": "c1", "text": d}))
        if flush:
            await ws.send(json.dumps({"type": "flush", "context_id": "c1"}))
        await ws.send(json.dumps({"type": "end", "context_id": "c1"}))
        return await collect(ws, stop_on_error=True)


async def test_voices_list_their_languages(default_voice):
    async with httpx.AsyncClient() as client:
        body = (await client.get(default_voice + "/v1/voices")).json()
    assert [(v["id"], v["language"], v["languages"]) for v in body["voices"]] == [("joe", "en-US", ["en"])]


async def test_chinese_to_the_english_voice_is_an_error_not_silence(default_voice):
    text = "你好，今天天气很好。我们下午三点见面。"
    _, msgs = await _speak(default_voice, [text[:5], text[5:]])
    last = msgs[-1]
    assert last["type"] == "error" and last["code"] == "unsupported_language", msgs
    assert last["context_id"] == "c1" and last["fatal"] is False
    assert last["languages"] == ["en"] and last["skipped"] == "你好，今天天气很好。我们下午三点见面"
    assert "en" in last["message"]
    assert not any(m["type"] == "done" for m in msgs)
    # the socket is still usable: the next context speaks
    _, msgs = await _speak(default_voice, ["Hello there."])
    assert msgs[-1]["type"] == "done" and not any(m["type"] == "warning" for m in msgs)


async def test_a_flush_does_not_hide_that_nothing_was_speakable(default_voice):
    _, msgs = await _speak(default_voice, ["你好，世界。"], flush=True)
    # the flush is acknowledged or not depending on whether the engine got to it before the end
    kinds = [(m["type"], m.get("code")) for m in msgs if m["type"] not in ("mark", "flushed")]
    assert kinds == [("warning", "unsupported_language"), ("error", "unsupported_language")]
    assert msgs[0]["skipped"] == "你好，世界" and msgs[-1]["skipped"] == "你好，世界"


async def test_mixed_text_is_spoken_with_a_warning_for_what_was_skipped(default_voice):
    audio, msgs = await _speak(
        default_voice, ["Hello 你", "好 world, see you at 3 点见面", " soon."], flush=True
    )
    warnings = [m for m in msgs if m["type"] == "warning"]
    assert [(w["code"], w["context_id"], w["skipped"], w["languages"]) for w in warnings] == [
        ("unsupported_language", "c1", "你好", ["en"]),
        ("unsupported_language", "c1", "点见面", ["en"]),
    ]
    assert msgs[-1]["type"] == "done" and len(audio) > 0


async def test_emoji_only_is_not_a_language_error(default_voice):
    _, msgs = await _speak(default_voice, ["🎉👍"])
    assert msgs[-1]["type"] == "done" and not any(m["type"] in ("warning", "error") for m in msgs)


async def test_http_refuses_text_with_nothing_to_say_and_marks_what_it_skipped(default_voice):
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(default_voice + "/v1/tts", json={"text": "你好，世界。"})
        assert r.status_code == 422
        assert r.json()["error"]["code"] == "unsupported_language"
        r = await client.post(default_voice + "/v1/tts", json={"text": "Hello 你好 world."})
        assert r.status_code == 200 and len(r.content) > 1000
        assert r.headers["x-voice-languages"] == "en"
        assert unquote(r.headers["x-skipped-text"]) == "你好"
        r = await client.post(default_voice + "/v1/tts", json={"text": "Hello world."})
        assert r.status_code == 200 and "x-skipped-text" not in r.headers


async def test_cosyvoice2_speaks_its_five_languages_and_names_them(tmp_path):
    from cosyvoice.tiny import write_model_dir
    from realtime.engines import create_engine

    engine = create_engine("cosyvoice2", str(write_model_dir(tmp_path / "tiny")))
    with serve(engine) as base:
        async with httpx.AsyncClient() as client:
            voices = (await client.get(base + "/v1/voices")).json()["voices"]
        assert voices and all(v["languages"] == ["zh", "en", "ja", "ko", "yue"] for v in voices)
        _, msgs = await _speak(base, ["你好，hello, こんにちは 안녕"])
        assert msgs[-1]["type"] == "done" and not any(m["type"] == "warning" for m in msgs)
        _, msgs = await _speak(base, ["Привет, мир"])
        assert msgs[-1]["code"] == "unsupported_language" and msgs[-1]["skipped"] == "Привет, мир"
        assert msgs[-1]["languages"] == ["zh", "en", "ja", "ko", "yue"]
